"""Constants shared by the in-guest agent and the host (agentd, vmmd): defined here only.

Channel names and ports, the protocol version, id rules, the kernel command-line pieces
the guest reads, size limits, error codes, the exec id of a container's first process.

STDLIB ONLY: this package runs inside the guest under a bare, trimmed python3.11.
"""

from __future__ import annotations

import re

# Version of the protocol in docs/agent-protocol.md. The host states its version in the
# first request after SYNC (``ping`` field ``protocol``) and the agent answers with its own
# (result field ``protocol``); any difference fails the connection, naming both. An agent
# or host that does not state one speaks UNVERSIONED (base64 stdio inside JSON).
PROTOCOL_VERSION = 2
UNVERSIONED = 1

# The channel: a virtio-serial port (QEMU) or a vsock stream (Firecracker, vhost-vsock).
SERIAL_PORT_NAME = "agent.0"
# The mount tag of the VM's 9P file share (QEMU's virtio-9p device); the agent mounts it and
# finds each container's directory (rootfs, m0..mN) under it.
SHARE_MOUNT_TAG = "hanabi"
VSOCK_PORT = 1024
# Firecracker (no shared-filesystem device): the agent connects to this host vsock port and
# mounts 9P2000.L over that stream (trans=fd); the host serves it with diod, confined to a
# root of its own where the VM's export root is SHARE_EXPORT_NAME (the 9P attach name).
# The kernel command line says so: CMDLINE_SHARE=SHARE_EXPORT_NAME.
SHARE_VSOCK_PORT = 1025

# Output and exit frames the agent keeps once written, and writes again after a host's SYNC
# (docs/agent-protocol.md, "Replay"): enough for all a host can lose when it dies, its output
# buffer for the process (agentd's `agent.output_buffer_bytes`, at most OUTPUT_BUFFER_MAX)
# and what sits in the socket between the VMM and agentd (REPLAY_SOCKET_ALLOWANCE, several
# times the default unix socket buffer of 208 KiB). Shared by the VM's processes.
REPLAY_BYTES = 8 << 20
REPLAY_SOCKET_ALLOWANCE = 1 << 20
OUTPUT_BUFFER_MAX = REPLAY_BYTES - REPLAY_SOCKET_ALLOWANCE
# The other way: the stdin a stand-in sent last, kept and sent again (each chunk with its
# `offset`) when it attaches to a restarted agentd; the agent drops what it had. What can
# be lost on the way is what the two sockets (stand-in to agentd, agentd to the VMM) hold:
# agentd sends each chunk on before it reads the next.
STDIN_REPLAY_BYTES = 2 << 20
SHARE_EXPORT_NAME = "/export"

# Kernel command line: the base the guest image is built for, and the words the agent reads.
# The last two keep an idle guest from waking its vCPU (each wake-up costs the host QEMU
# CPU under TCG; measured, an idle guest at about 7 timer interrupts/s went to about 2 and
# QEMU's idle CPU from 0.25 % to 0.05 % of a core): kcompactd's proactive compaction check
# every 0.5 s (sysctl vm.compaction_proactiveness=0: compaction on demand stays) and the
# soft-lockup watchdog's hrtimer every 4 s (nowatchdog; under TCG on a busy host it could
# only report false lockups).
KERNEL_CMDLINE = ("console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check rcupdate.rcu_expedited=1 "
                  "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests 8250.nr_uarts=1 "
                  "sysctl.vm.compaction_proactiveness=0 nowatchdog rdinit=/init")
CMDLINE_CHANNEL = "hanabi.channel"  # hanabi.channel=vsock: listen on VSOCK_PORT (default: serial)
CHANNEL_SERIAL = "serial"
CHANNEL_VSOCK = "vsock"
CMDLINE_POWEROFF = "hanabi.poweroff"  # hanabi.poweroff=reboot: end the VM with a restart
POWEROFF_REBOOT = "reboot"
CMDLINE_SHARE = "hanabi.share"  # hanabi.share=PATH: the file share is 9P over vsock, attach name PATH
# hanabi.trace=1 (through `vmm.kernel_cmdline_extra`): the agent logs, on the guest console,
# how long each request took from its frame's arrival to its reply (a measuring aid).
CMDLINE_TRACE = "hanabi.trace"


def cmdline_word(key: str, value: str) -> str:
    """One ``key=value`` word of the kernel command line."""
    return f"{key}={value}"


# Ids. Container and exec ids (and sandbox ids on the host): safe as path components.
ID_MAX_LEN = 128
ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ID_RE = re.compile(ID_REGEX)  # use fullmatch ("$" alone would let a trailing newline in)
INIT_EXEC_ID = "init"  # the exec id of a container's first process, reserved for `start`
SERIAL_REGEX = r"^[A-Za-z0-9_-]{1,20}$"  # a virtio-blk serial (VIRTIO_BLK_ID_BYTES: 20 at most)
SHARE_ROOTFS_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/rootfs$"  # a container's root in the share
# A clone of a VM template gets this many fresh random bytes for its RNG (`restored`).
RESTORE_SEED_BYTES = 64
HOSTNAME_REGEX = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$"

# Links, by the kernel's rules: a name fits IFNAMSIZ (15 characters and the NUL), a MAC is
# six hex octets, an MTU is at least IPv4's minimum. Shared by the NIC the host plugs
# (vmmd) and the link the guest configures (configure_network).
LINK_NAME_REGEX = r"^[A-Za-z0-9_.-]{1,15}$"
MAC_REGEX = r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$"
MIN_MTU = 68
MAX_MTU = 65535

# Sizes.
MAX_FRAME = 1 << 20  # bytes of one frame's body
MAX_DATA_CHUNK = 64 * 1024  # raw bytes of stdio (or DNS) data in one frame
MAX_TEXT = 4096  # characters of a free-text field the guest sends (error messages, args)
MAX_PID = 1 << 22
MAX_SIGNAL = 64
MAX_TTY_DIM = 65535

# Error codes carried in failed replies.
E_NOT_FOUND = "NOT_FOUND"
E_INVALID_ARGUMENT = "INVALID_ARGUMENT"
E_FAILED_PRECONDITION = "FAILED_PRECONDITION"
E_ALREADY_EXISTS = "ALREADY_EXISTS"
E_INTERNAL = "INTERNAL"
ERROR_CODES = (E_NOT_FOUND, E_INVALID_ARGUMENT, E_FAILED_PRECONDITION, E_ALREADY_EXISTS, E_INTERNAL)

STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"

# Message types (docs/agent-protocol.md; their fields are in ``messages``).
# Host -> guest requests.
T_PING = "ping"
T_CREATE_CONTAINER = "create_container"
T_START = "start"
T_EXEC = "exec"
T_SIGNAL = "signal"
T_CLOSE_STDIN = "close_stdin"
T_RESIZE = "resize"
T_PS = "ps"
T_DESTROY_CONTAINER = "destroy_container"
T_SHUTDOWN = "shutdown"
T_SYNC = "sync"
T_CONFIGURE_NETWORK = "configure_network"
T_RESTORED = "restored"
# Host -> guest events.
T_STDIN = "stdin"
T_DNS_ANSWER = "dns_answer"
# Guest -> host messages.
T_REPLY = "reply"
T_READY = "ready"
T_OUTPUT = "output"
T_EXIT = "exit"
T_PROTOCOL_ERROR = "protocol_error"
T_DNS_QUERY = "dns_query"
T_OOM = "oom"
# What FrameDecoder yields where a SYNC marker was: not a message type (a frame claiming it is
# refused as corrupt), so it is never taken for the `sync` request (flush the filesystems).
T_SYNC_MARKER = "sync_marker"

TYPE_CHECKING = False
if not TYPE_CHECKING:  # computed at run time; mypy reads the names above through `import *`
    __all__ = [name for name in dir() if (name.isupper() and name != "TYPE_CHECKING") or name == "cmdline_word"]

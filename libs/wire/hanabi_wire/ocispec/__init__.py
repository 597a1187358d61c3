"""The OCI settings the guest applies, validated with runc's rules: pure functions that only
inspect a config and raise ValueError naming the field (no I/O, no side effects).

``process`` (the process object: args, env, user, rlimits, ... and ``caps``: capabilities
and LSM labels), ``linux`` (the ``linux`` field: namespaces, id maps, sysctls, devices,
paths, time offsets; ``resources`` for linux.resources) and ``seccomp`` (the profile,
turned into a ``Plan``). The agent validates create_container and exec with them; the
runtime (hanabi_runtime.guest_linux) runs the same functions on config.json, so a bad
setting fails before anything is provisioned, with the message the guest would give. What
applies them (namespaces, the seccomp filter, capabilities, cgroup files, spawning) is the
agent's (hanabi_guest).

STDLIB ONLY: runs inside the guest. Nothing is imported here: the agent imports each
module when it first needs it.
"""

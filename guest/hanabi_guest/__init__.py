"""hanabi_guest: the in-guest agent and the guest image builder.

Guest side (stdlib only, copied into the initramfs with the protocol package ``hanabi_wire``
and run by python3.11 as PID 1): ``agent`` (loop), ``channel``, ``poller``, ``core``,
``handlers``, ``procio``, ``process``, ``sandbox``. Host side (build time): ``image`` and ``cli``
(``hanabi-image``), ``debs``, ``kernel``, ``elf``, ``cpio``, ``selftest``.
This file must stay import-free: the guest imports it too.
"""

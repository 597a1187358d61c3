"""hanabi_image: the host-side builder of the guest image (``hanabi-image``).

Builds the guest kernel + initramfs from Debian packages (``debs``, ``kernel``, ``elf``,
``cpio``), with the in-guest agent (``hanabi_guest``, read as files, never imported here) and
the protocol package ``hanabi_wire``; ``selftest`` runs the agent with the trimmed interpreter
before a build is accepted.
"""

"""hanabi_guest: the in-guest agent (PID 1 of the microVM).

Stdlib only, copied into the initramfs with the protocol package ``hanabi_wire`` and run by
python3.11 as PID 1: ``agent`` (loop), ``channel``, ``poller``, ``core``, ``handlers``,
``procio``, ``process``, ``sandbox`` and the modules they use. The host-side image builder
(``hanabi-image``) is ``hanabi_image`` (services/image); nothing under services/ imports this
package (tests/unit/test_guest_split.py).
This file must stay import-free: the guest imports it too.
"""

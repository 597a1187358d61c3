"""The ZeroMQ RPC layer: a versioned envelope, a ROUTER server, a typed DEALER client."""

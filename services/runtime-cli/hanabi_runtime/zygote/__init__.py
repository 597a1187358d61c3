"""The zygote: a server that has imported what `create`, `run` and `exec` need, and forks a
worker to run each such command for a `hanabi-runtime` process.

Those commands import pydantic, jsonschema, pyzmq and the daemons' models and clients:
0.4 s of every container's start on this host, against 0.02 s for the interpreter alone.
The CLI (`hanabi_runtime.lean.zygote`) connects to `<run_dir>/zygote.sock`, hands over its
command line, environment, working directory, umask and stdio, and the worker
(`worker`) runs the command exactly as the CLI would have. What must be the CLI's own is
done by the CLI at the worker's request: it spawns and reaps the stand-ins (the shim, a
subreaper, must inherit them) and receives the exit status. Without a zygote, or when the
zygote refuses (another mount or pid namespace), the CLI runs the command itself.
`protocol` is the one definition of the messages; `server` accepts and forks.
"""

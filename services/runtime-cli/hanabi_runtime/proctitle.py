"""The process title host `ps` (and so `docker top`) shows, without setproctitle's package.

The `setproctitle` package's `__init__` imports `logging` (about 1 MiB of private memory in
every stand-in, which runs once per container process); only its C function is needed. This
loads the package's extension module `_setproctitle` from the package directory, as the
package itself would, and leaves the package unimported. Stdlib only.
"""

from __future__ import annotations

import importlib.machinery

EXTENSION = "_setproctitle"


def set_title(title: str) -> bool:
    """Set this process's title (its command line as `ps` shows it); False when the
    extension is not there (the title stays the Python command line)."""
    package = importlib.machinery.PathFinder.find_spec("setproctitle")
    if package is None or not package.submodule_search_locations:
        return False
    spec = importlib.machinery.PathFinder.find_spec(EXTENSION, list(package.submodule_search_locations))
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return False
    module = spec.loader.create_module(spec)
    spec.loader.exec_module(module)
    module.setproctitle(title)
    return True

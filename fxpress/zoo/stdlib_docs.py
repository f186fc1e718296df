"""Extract the stdlib-docs retrieval pairs: run as a script in an isolated interpreter.

    python -I stdlib_docs.py   ->  JSON list of [qualified name, cleaned docstring]

It imports only the standard library, so `fxpress.zoo.datasets` runs it with
``python -I`` in a fresh process: what a module's namespace holds then does
not depend on what the calling process imported or patched (test runs,
notebooks), and every build on one Python version gives the same pairs.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import sys
import warnings
from typing import Iterator

log = logging.getLogger("fxpress.zoo.stdlib_docs")

# Standard-library modules whose import only defines things (no I/O, threads, windows or prints), and
# packages whose submodules are walked too.  A module that fails to import here is skipped.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "code", "codecs", "codeop",
    "colorsys", "compileall", "configparser", "contextlib", "copy", "copyreg", "csv", "dataclasses",
    "datetime", "difflib", "dis", "doctest", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "imaplib",
    "inspect", "ipaddress", "keyword", "linecache", "locale", "lzma", "mailbox", "mimetypes", "modulefinder",
    "netrc", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "ssl", "stat",
    "statistics", "string", "stringprep", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing", "uuid",
    "warnings", "wave", "weakref", "zipapp", "zipfile", "zipimport",
)
STDLIB_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "dbm", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref", "xml", "xmlrpc",
    "zoneinfo",
)
MIN_DOC_CHARS = 40
MIN_DOC_WORDS = 8


def _stdlib_module_names() -> list[str]:
    """The allow-listed modules and the submodules of the allow-listed packages (tests excluded), sorted."""
    names = set(STDLIB_MODULES)
    for package_name in STDLIB_PACKAGES:
        package = _import_quietly(package_name)
        if package is None:
            continue
        names.add(package_name)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), package_name + ".",
                                          onerror=lambda name: None):
            parts = info.name.split(".")
            if not any(part.startswith("test") or part == "__main__" for part in parts):
                names.add(info.name)
    return sorted(names)


def _import_quietly(name: str):
    """The module, or None when it does not import here (platform-specific, missing C library)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            log.debug("stdlib-docs: skipping %s: %s", name, err)
            return None


def _documented_objects(module) -> Iterator[tuple[str, object]]:
    """(qualified name, object) for the module, its functions and classes, and the classes' methods and
    properties, for names defined in this module (not imported into it); dunder names skipped."""
    yield module.__name__, module
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("__") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{attr}", obj
        elif inspect.isclass(obj):
            yield f"{module.__name__}.{attr}", obj
            for name, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not name.startswith("__") and (inspect.isfunction(member) or isinstance(member, property)):
                    yield f"{module.__name__}.{attr}.{name}", member


def _build_stdlib_docs() -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) pairs: own docstrings only (never inherited), at least
    MIN_DOC_CHARS characters and MIN_DOC_WORDS words, each docstring kept once (its first name)."""
    docs: dict[str, str] = {}
    for module_name in _stdlib_module_names():
        module = _import_quietly(module_name)
        if module is None:
            continue
        for name, obj in _documented_objects(module):
            raw = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
            doc = inspect.cleandoc(raw)
            if len(doc) >= MIN_DOC_CHARS and len(doc.split()) >= MIN_DOC_WORDS:
                docs.setdefault(name, doc)
    seen: set[str] = set()
    pairs = []
    for name in sorted(docs):
        if docs[name] not in seen:
            seen.add(docs[name])
            pairs.append((name, docs[name]))
    return pairs




if __name__ == "__main__":
    json.dump(_build_stdlib_docs(), sys.stdout)

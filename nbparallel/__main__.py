"""``python -m nbparallel install | uninstall``: load the extension in every IPython kernel.

``install`` appends a marked block to ``ipython_kernel_config.py`` of the user's IPython profile
(``default`` unless ``--profile`` says otherwise; ``IPYTHONDIR`` is honoured)::

    c.InteractiveShellApp.extensions.append("nbparallel")

``uninstall`` removes exactly that block (and the file, if nothing else is left in it). Both say
what they changed and change nothing on a second run. The kernel config file, not
``ipython_config.py``, so terminal IPython sessions don't start a sidecar they may not need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

CONFIG_FILE = "ipython_kernel_config.py"
BEGIN = "# >>> nbparallel >>> added by `python -m nbparallel install`; `python -m nbparallel uninstall` removes it"
END = "# <<< nbparallel <<<"
BLOCK = f'{BEGIN}\nc.InteractiveShellApp.extensions.append("nbparallel")\n{END}\n'


def profile_dir(profile: str, *, create: bool) -> Path | None:
    """The profile's folder, created if asked (None if it does not exist and ``create`` is false)."""
    # IPython only for this command: the package itself never needs it
    from IPython.core.profiledir import ProfileDir, ProfileDirError  # (see above)
    from IPython.paths import get_ipython_dir  # (see above)

    profiles: Any = ProfileDir  # its class methods have no type annotations
    ipython_dir = get_ipython_dir()
    try:
        return Path(profiles.find_profile_dir_by_name(ipython_dir, profile).location)
    except ProfileDirError:
        if not create:
            return None
        return Path(profiles.create_profile_dir_by_name(ipython_dir, profile).location)


def _without_block(text: str) -> str | None:
    """``text`` with our block removed, or None if it has none."""
    start = text.find(BEGIN)
    if start < 0:
        return None
    end = text.find(END, start)
    end = len(text) if end < 0 else end + len(END)
    if text[end : end + 1] == "\n":
        end += 1
    return text[:start] + text[end:]


def install(profile: str = "default") -> bool:
    """Add the block; True if the file changed."""
    folder = profile_dir(profile, create=True)
    assert folder is not None
    path = folder / CONFIG_FILE
    text = path.read_text() if path.exists() else ""
    if _without_block(text) is not None:
        print(f"nbparallel is already loaded by {path}; nothing changed")
        return False
    separator = "" if not text or text.endswith("\n") else "\n"
    path.write_text(text + separator + BLOCK)
    print(f'added "nbparallel" to c.InteractiveShellApp.extensions in {path}\n'
          "new kernels of this profile load it (and start its sidecar) at launch")
    return True


def uninstall(profile: str = "default") -> bool:
    """Remove the block; True if the file changed."""
    folder = profile_dir(profile, create=False)
    path = folder / CONFIG_FILE if folder is not None else None
    remaining = _without_block(path.read_text()) if path is not None and path.exists() else None
    if path is None or remaining is None:
        print(f"nbparallel was not installed in the IPython profile {profile!r}; nothing changed")
        return False
    if remaining.strip():
        path.write_text(remaining)
        print(f"removed nbparallel from c.InteractiveShellApp.extensions in {path}")
    else:
        path.unlink()
        print(f"removed {path} (it only loaded nbparallel)")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbparallel", description="Set up the nbparallel IPython extension.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("install", "load nbparallel in every IPython kernel of the profile"),
                       ("uninstall", "undo install")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--profile", default="default", help="IPython profile (default: %(default)s)")
    args = parser.parse_args(argv)
    (install if args.command == "install" else uninstall)(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

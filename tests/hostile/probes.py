"""Looking at a live box from outside: its Django shell, its files, its processes."""
import hashlib
import json
import os
from pathlib import Path


def shell(box, code: str, timeout: float = 300):
    """Run code in the box's Django shell; return the JSON it prints on its last line."""
    out = box.manage("shell", "--no-imports", "-c", code, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def tree_digest(root: Path) -> dict:
    """Return {relative path: sha256, 'dir' or 'link -> target'} of everything under root, following no link."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def files_under(root: Path) -> list[Path]:
    """Return every non-directory under root (an empty list when root does not exist)."""
    return [Path(d) / f for d, _, names in os.walk(root) for f in names]


def assert_alive(box) -> None:
    """Assert that every process the box started is still running."""
    dead = {name: proc.returncode for name, proc in box.procs.items() if proc.poll() is not None}
    assert not dead, f"processes died: {dead}"

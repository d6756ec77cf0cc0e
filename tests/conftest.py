import hashlib
from pathlib import Path

import torch

# Two cores: keep intra-op threads bounded so test timings stay predictable.
torch.set_num_threads(2)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: equal digests mean nothing was written or changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }

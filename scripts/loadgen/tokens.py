"""JWTs for the protocols that carry one (GradAgenda, wschat with a JWT secret).

Minted in process by chatd's own ``chatd.tokens.mint`` when the HS256
secret is known; otherwise by ``chatd token``, which reads the server's
config.
"""

from __future__ import annotations

import subprocess
import sys


def mint_token(secret: str, user_id: str, ttl: int = 3600) -> str:
    """An HS256 token for ``user_id``, valid ``ttl`` seconds."""
    from chatd.tokens import mint  # the repository root is on sys.path (loadtest.py)
    return mint(secret, user_id, ttl)


def tokens_from_chatd(names: list[str], config_path: str | None) -> dict[str, str]:
    """Mint tokens with ``chatd token`` (one process per user: slow, but needs no secret)."""
    extra = ["--config", config_path] if config_path else []
    print(f"loadtest: minting {len(names)} tokens with `chatd token` (--jwt-secret is faster)",
          file=sys.stderr)
    tokens = {}
    for batch in range(0, len(names), 8):
        procs = {n: subprocess.Popen([sys.executable, "-m", "chatd", "token", n, "--ttl",
                                      "3600", *extra], stdout=subprocess.PIPE, text=True)
                 for n in names[batch:batch + 8]}
        for name, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit("loadtest: `chatd token` failed; pass --jwt-secret")
            tokens[name] = out.strip()
    return tokens

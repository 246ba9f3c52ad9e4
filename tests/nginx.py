"""A real nginx for the tests, from an example site of docs/examples/.

``Nginx(tmp_path)`` checks that nginx is there (under ``CI=true`` its
absence fails the test, else skips it), ``start(site)`` runs nginx in the
foreground with ``site`` as its http (or, for a site that is a ``stream``
block, stream) configuration, everything it writes kept in ``tmp_path``,
and ``stop()`` ends every nginx it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import GUARD

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
_TEMP_DIRS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


def required(program: str, why: str) -> None:
    """Fail under CI=true, else skip, saying what to install."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{program} is required under CI=true (.ci/run installs it)")
    pytest.skip(f"{program} is missing ({why})")


class Nginx:
    def __init__(self, tmp_path: Path) -> None:
        if not os.path.exists(NGINX):
            required("nginx", "apt-get install nginx-light libnginx-mod-stream")
        self.dir = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, site: str) -> None:
        """Run nginx with ``site`` (listen addresses already filled in)."""
        stream = site.lstrip().startswith("#") and "stream {" in site
        if stream and not STREAM_MODULE.exists():
            required("nginx's stream module", "apt-get install libnginx-mod-stream")
        for name in _TEMP_DIRS:
            (self.dir / name).mkdir(exist_ok=True)
        main = [f"pid {self.dir}/nginx.pid;", f"error_log {self.dir}/error.log;",
                "worker_processes 1;", "events { worker_connections 4096; }"]
        if stream:
            main = [f"load_module {STREAM_MODULE};", *main, site]
        else:
            main += ["http {", "access_log off;", f"client_body_temp_path {self.dir}/body;",
                     *(f"{name}_temp_path {self.dir}/{name};" for name in _TEMP_DIRS[1:]),
                     site, "}"]
        conf = self.dir / "nginx.conf"
        conf.write_text("\n".join(main) + "\n")
        self.procs.append(subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(conf),
                                            "-g", "daemon off;"], stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(GUARD)

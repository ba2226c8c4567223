"""`script/server`: cog's own HTTP server for this predictor, without Docker.

cog's server validates inputs and serves /openapi.json only from .cog/openapi_schema.json,
which `cog build` would write; we write it from predict.py first, then hand over. Arguments
go on to cog's server: `script/server --upload-url URL` PUTs outputs there.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tooling.cli import REPO, use_demo_model_if_needed
from tooling.openapi import write_openapi_schema


def main() -> None:
    predictor = os.environ.get("PREDICTOR", "Predictor")
    use_demo_model_if_needed()
    # Each server gets its own working folder for .cog/: cog reads the schema only after
    # setup, so two servers sharing the repo's .cog/ could serve each other's schema.
    workdir = Path(tempfile.mkdtemp(prefix="flux-server-"))
    reference = f"{REPO / 'predict.py'}:{predictor}"
    write_openapi_schema(reference, workdir / ".cog" / "openapi_schema.json")
    print(f"Serving predict.py:{predictor}; schema in {workdir / '.cog'}.", file=sys.stderr)
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": reference,
        "PORT": os.environ.get("PORT", "5000"),
        # The server's worker runs the `python` on PATH: make it this environment's.
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    os.chdir(workdir)
    host = os.environ.get("HOST", "127.0.0.1")
    # Our arguments go on to cog's server (--upload-url, --await-explicit-shutdown, --host...);
    # a --host among them wins over HOST, as argparse keeps the last.
    command = [sys.executable, "-m", "cog.server.http", "--host", host, *sys.argv[1:]]
    os.execvpe(sys.executable, command, env)


if __name__ == "__main__":
    main()

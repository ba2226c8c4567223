"""`script/server`: cog's own HTTP server for this predictor, without Docker.

cog's server validates inputs and serves /openapi.json only from .cog/openapi_schema.json,
which `cog build` would write; we write it from predict.py first, then hand over.
"""

from __future__ import annotations

import os
import sys

from engine.cli import REPO, use_demo_model_if_needed
from engine.openapi import write_openapi_schema


def main() -> None:
    predictor = os.environ.get("PREDICTOR", "Predictor")
    reference = f"predict.py:{predictor}"
    use_demo_model_if_needed()
    schema = write_openapi_schema(reference, root=REPO)
    print(f"Wrote {schema.relative_to(REPO)} for {reference}.", file=sys.stderr)
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": reference,
        "PORT": os.environ.get("PORT", "5000"),
        # The server's worker runs the `python` on PATH: make it this environment's.
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    os.chdir(REPO)  # the server reads .cog/ relative to its working folder
    host = os.environ.get("HOST", "127.0.0.1")
    os.execvpe(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", host], env)


if __name__ == "__main__":
    main()

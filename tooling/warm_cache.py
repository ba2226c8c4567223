"""script/warm-cache: set the predictor up as a server does (loading, compiling, warming up), which writes the
compile cache (engine/compile_cache.py) when none of its name was there, then say what happened, last line JSON.

Run it where the image runs, with the weights the image ships: on a GPU machine, in the image's environment
(`cog exec --gpus all script/warm-cache` in this folder, whose flux-weights/ the image then carries), with the same
FLUX_* settings as the deployment. A cache is per GPU type, torch, CUDA and Triton version and compile settings.
"""

from __future__ import annotations

import json
import sys
import time

from torch._dynamo.utils import counters


def main() -> int:
    import predict

    start = time.perf_counter()
    predictor = predict.Predictor()
    predictor.setup()
    engine = predictor.engine
    report = {
        "file": str(engine.compile_cache),
        "loaded": engine.compile_cache_loaded,
        "written": engine.compile_cache_written,
        "standard_path_compiled": engine.standard_compiled,
        "setup_s": round(time.perf_counter() - start, 1),
        "graphs": counters["stats"]["unique_graphs"],
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }
    if not (report["loaded"] or report["written"]):
        print("Nothing was compiled, or the cache could not be written: see the log above.", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["loaded"] or report["written"] else 1


if __name__ == "__main__":
    sys.exit(main())

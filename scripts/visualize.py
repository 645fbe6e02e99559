"""Open an export's graph in Model Explorer, served on localhost.

    python scripts/visualize.py exported/<name>                 # the torch.export program
    python scripts/visualize.py exported/<name> --source onnx   # the ONNX file
    python scripts/visualize.py exported/<name> --port 8081 --no-browser

Logic: ``project.deploy.visualize``.
"""

import argparse
import sys

from project.deploy.visualize import SOURCES, VisualizeError, serve


def main() -> None:
    """Parse the arguments and serve the export until Ctrl+C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="an export directory, e.g. exported/mlp")
    parser.add_argument("--source", choices=SOURCES, default="exported_program")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    args = parser.parse_args()
    try:
        serve(args.export_dir, args.source, args.host, args.port, not args.no_browser)
    except VisualizeError as err:
        sys.exit(f"visualize: {err}")


if __name__ == "__main__":
    main()

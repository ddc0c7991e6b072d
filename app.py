"""Serve the control room: ``python app.py`` on the embedded default model, or ``--model PATH``."""

from __future__ import annotations

import argparse
import sys

from optim.policy import ModelLoadError, Policy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve the medical preference workbench.")
    parser.add_argument("--model", default=None, help="local diffusers folder (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a shared box)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        policy = Policy.load(args.model)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from workbench.ui import build_page

    page = build_page(policy)
    page.queue().launch(
        server_name=args.host,
        server_port=args.port,
        enable_monitoring=False,
        run_history=False,
        show_error=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

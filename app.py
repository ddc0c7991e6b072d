"""Serve the control room: ``python app.py`` on the embedded default model, or ``--model PATH``.

``--auth users.yaml`` turns on logins (make the file with ``python -m workbench.auth add-user``);
without it the page runs in local single-user mode and asks for a name, and then only on a
loopback address unless ``--insecure-no-auth`` says otherwise (every visitor would be an admin).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from data.store import StoreError
from optim.generators.kernels import check_noise_level
from optim.policy import DTYPES, ModelLoadError
from optim.selector.model import SelectorLoadError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve the medical preference workbench.")
    parser.add_argument("--model", default=None,
                        help="local diffusers folder of Stable Diffusion 1.x/2.x, SDXL, SD 3 / 3.5 or FLUX.1, the family "
                             "read from its model_index.json (default: the embedded model)")
    parser.add_argument("--selector", default=None,
                        help="selector folder, trained on your ratings CSV (python -m workbench.selector train); "
                             "'gates' for the rule gates alone (a new domain with no ratings yet); "
                             "default: the embedded selector (CT, MRI, chest X-ray, OCT)")
    parser.add_argument("--workdir", default="runs/demo", help="where the store, blobs and versions live")
    parser.add_argument("--store-url", default=None, help="SQLAlchemy URL (default: SQLite in the work directory)")
    parser.add_argument("--auth", default=None, metavar="USERS_YAML",
                        help="accounts file: experts log in, only admins update or roll back")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a shared box)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="precision of the frozen networks (default: bf16, or fp16, on a GPU; fp32 on a CPU)")
    parser.add_argument("--lora", default=None, metavar="FILE",
                        help="a diffusers LoRA file (.safetensors) the first version starts from (base + this LoRA)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="denoising steps of every group the room draws (ranking, training, /sample, A/B; default "
                             "20), stochastic DDIM steps for Stable Diffusion / SDXL and flow SDE steps for SD 3 / FLUX: "
                             "fewer sample and train faster, where the model's images hold up at N")
    parser.add_argument("--collapse-guard", type=float, default=None, metavar="FRACTION",
                        help="refuse an update whose candidates on fixed seeds differ this share less from one another "
                             "than the base model's, e.g. 0.3 (default: off; the variety is reported either way)")
    parser.add_argument("--noise-level", type=float, default=None, metavar="A",
                        help="SD 3 / FLUX only: the noise level of the Flow-GRPO SDE the room samples with, in (0, 1] "
                             "(default 0.7)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a non-loopback --host without --auth: everyone who reaches it is an admin")
    args = parser.parse_args(argv)
    if args.auth is None and not is_loopback(args.host) and not args.insecure_no_auth:
        print(f"error: --host {args.host} without --auth: anyone who can reach this address could rank, update, "
              "roll back and export as an admin; pass --auth users.yaml (python -m workbench.auth add-user), "
              "or --insecure-no-auth if that is really meant", file=sys.stderr)
        return 2

    if args.steps is not None and not 1 <= args.steps <= 1000:
        print(f"error: --steps must be between 1 and 1000, got {args.steps}", file=sys.stderr)
        return 2
    if args.collapse_guard is not None and not 0 < args.collapse_guard < 1:
        print(f"error: --collapse-guard is the share of variety an update may lose, between 0 and 1 (e.g. 0.3), "
              f"got {args.collapse_guard}", file=sys.stderr)
        return 2
    if args.noise_level is not None:
        try:
            check_noise_level(args.noise_level)
        except ValueError as error:
            print(f"error: --noise-level: {error}", file=sys.stderr)
            return 2
    taken = port_problem(args.host, args.port)  # before the model loads: minutes for SDXL or FLUX
    if taken:
        print(f"error: --host {args.host} --port {args.port}: {taken}", file=sys.stderr)
        return 2

    from workbench.api import RoomAPI
    from workbench.auth import Users, UsersFileError
    from workbench.room import ControlRoom, RoomConfig
    from workbench.ui import serve

    try:
        users = None if args.auth is None else Users(args.auth)
        config = RoomConfig(max_diversity_drop=args.collapse_guard)
        if args.steps is not None:
            config.steps = args.steps
        room = ControlRoom(args.model, args.workdir, selector=args.selector, store_url=args.store_url,
                           auto_register=users is None, dtype=args.dtype, lora=args.lora, config=config,
                           noise_level=args.noise_level)
    except (ModelLoadError, SelectorLoadError, UsersFileError, StoreError) as error:  # anything else is a bug: its traceback shows
        print(f"error: {error}", file=sys.stderr)
        return 2
    if users is None and not is_loopback(args.host):
        print("warning: --insecure-no-auth: anyone who can reach this address can rank, update, roll back and export",
              file=sys.stderr)
    serve(RoomAPI(room, users), host=args.host, port=args.port)
    return 0


def port_problem(host: str, port: int) -> str | None:
    """Why the page could not listen on ``host:port`` (out of range, an unknown address, or in use), or None."""
    if not 1 <= port <= 65535:
        return "a port is a number from 1 to 65535"
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        return f"not an address of this machine ({error.strerror})"
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it: a closing socket is no owner
        try:
            probe.bind(address)
        except OSError as error:
            return f"cannot listen there ({error.strerror}): another server may hold it; pass another --port"
    return None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: localhost, 127.0.0.0/8, ::1 (any other name counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())

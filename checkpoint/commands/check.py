"""`checkpoint check`: what this kernel offers the engine, probed by trying."""

from __future__ import annotations

def register(sub) -> None:
    p = sub.add_parser("check", help="probe the kernel features the engine needs",
                       description="Probe each kernel capability by trying it and report "
                                   "which dirty-page trackers are usable.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..kerndat import FEATURES, probe_all
    kd = probe_all()
    if args.json:
        from ..cli import emit_json
        emit_json(kd.as_json())
        return 0
    print(f"kernel {kd.kernel}")
    for name in FEATURES:
        ok = kd.features[name]
        line = f"  {name:<20} {'yes' if ok else 'no'}"
        if not ok:
            line += f"  ({kd.reasons[name]})"
        print(line)
    print(f"trackers: {', '.join(kd.trackers)} (auto picks {kd.trackers[0]})")
    return 0

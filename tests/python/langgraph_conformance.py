"""Runs LangGraph's checkpointer conformance suite on BreakwaterSaver
against a running control plane.

    python langgraph_conformance.py JSON_URL [TOKEN]

JSON_URL is the control plane's URL (its gRPC port, or --http-listen), such as
http://127.0.0.1:7070. Prints the suite's full report (each test, with
tracebacks), then one line of JSON: the report as a dict. Exits 1 unless
all 8 capabilities were detected and passed.

It imports the client from clients/python in this repository, so it needs
no installation (PYTHONPATH=clients/python works as well).
"""

import asyncio
import json
import sys
from pathlib import Path

# The client in this tree comes before any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from breakwater.langgraph import BreakwaterSaver  # noqa: E402
from langgraph.checkpoint.conformance import checkpointer_test, validate  # noqa: E402
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES  # noqa: E402
from langgraph.checkpoint.conformance.report import ProgressCallbacks  # noqa: E402

URL = sys.argv[1]
TOKEN = sys.argv[2] if len(sys.argv) > 2 else None


@checkpointer_test(name="BreakwaterSaver")
async def breakwater():
    # The suite makes a fresh saver for each capability; every test uses
    # fresh thread ids, so they can share one control plane.
    saver = BreakwaterSaver(URL, token=TOKEN)
    yield saver
    await saver.aclose()


async def main() -> int:
    report = await validate(breakwater, progress=ProgressCallbacks.verbose())
    report.print_report()
    print(json.dumps(report.to_dict()), flush=True)
    # passed_all() ignores the capabilities it did not detect: insist on
    # all eight, detected and passed.
    missing = [
        c.value
        for c in ALL_CAPABILITIES
        if not ((r := report.results.get(c.value)) and r.detected and r.passed)
    ]
    if missing:
        print("not detected or not passed: " + ", ".join(missing), file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

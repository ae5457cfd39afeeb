"""A real LangGraph graph on BreakwaterSaver, killed mid-run and resumed by
another process: extract -> validate -> enrich -> report.

    python langgraph_crash.py run     URL THREAD SIDE_EFFECTS [--crash-in NODE] [--token T]
    python langgraph_crash.py resume  URL THREAD SIDE_EFFECTS [--token T]
    python langgraph_crash.py review  URL THREAD SIDE_EFFECTS [--token T]
    python langgraph_crash.py approve URL THREAD SIDE_EFFECTS [--answer JSON] [--token T]

URL is the control plane's (its gRPC port, or --http-listen). Every node appends
its name as a line to SIDE_EFFECTS, flushed and fsynced, just before it
returns: the file records which nodes finished, across processes.

- run: runs the graph on a fresh input. With --crash-in NODE, that node
  appends "NODE-started" and the process SIGKILLs itself: no cleanup, no
  exception handler, as if the machine had died.
- resume: continues the thread where it stopped (invoke(None, config)).
  After `run --crash-in enrich` and `resume`, the file reads extract,
  validate, enrich-started, enrich, report: the nodes that finished
  before the crash did not run again.
- review: the same graph, but validate asks a person first, with
  interrupt(); the process ends at the question.
- approve: another process answers it with Command(resume=ANSWER) (by
  default {"approved": true, "reviewer": "ops"}), and the graph runs on.

Each mode prints one line of JSON: the mode, the thread, the final state,
the nodes still to run ("next") and any open interrupts.

Checkpoints are stored with durability="sync": each step is in the control
plane before the next one starts, so a crash loses only the running node.
"""

import argparse
import json
import operator
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

# The client in this tree comes before any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from breakwater.langgraph import BreakwaterSaver  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.types import Command, interrupt  # noqa: E402

DOCUMENT = "INV-42|ACME GmbH|EUR|widgets:2x400.00|bolts:10x20.25|freight:1x232.00"
DEFAULT_ANSWER = {"approved": True, "reviewer": "ops"}


class Invoice(TypedDict, total=False):
    document: str
    invoice: dict[str, Any]
    validation: dict[str, Any]
    vendor: dict[str, Any]
    report: str
    # Every node adds its name: the order the graph itself saw.
    done: Annotated[list[str], operator.add]


def record(path: str, line: str) -> None:
    """Appends a line to the side-effects file and makes it durable."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def build(effects: str, crash_in: str | None, review: bool):
    def finish(name: str, update: dict[str, Any]) -> dict[str, Any]:
        if name == crash_in:
            record(effects, f"{name}-started")
            os.kill(os.getpid(), signal.SIGKILL)
        record(effects, name)
        return {**update, "done": [name]}

    def extract(state: Invoice) -> dict[str, Any]:
        number, vendor, currency, *lines = state["document"].split("|")
        items = []
        for line in lines:
            item, amount = line.split(":")
            quantity, price = amount.split("x")
            items.append({"item": item, "quantity": int(quantity), "price": float(price)})
        invoice = {"number": number, "vendor": vendor, "currency": currency, "lines": items}
        return finish("extract", {"invoice": invoice})

    def validate(state: Invoice) -> dict[str, Any]:
        invoice = state["invoice"]
        total = round(sum(i["quantity"] * i["price"] for i in invoice["lines"]), 2)
        validation: dict[str, Any] = {"total": total, "ok": total > 0}
        if review:
            # Runs the node again from the top when answered, in whichever
            # process answers: nothing above this line may have effects.
            answer = interrupt(
                {"question": "approve this invoice?", "number": invoice["number"], "total": total}
            )
            validation["review"] = answer
            approved = answer.get("approved") if isinstance(answer, dict) else answer
            validation["ok"] = validation["ok"] and bool(approved)
        return finish("validate", {"validation": validation})

    def enrich(state: Invoice) -> dict[str, Any]:
        vendor = {"name": state["invoice"]["vendor"], "country": "DE", "vat_rate": 0.19}
        return finish("enrich", {"vendor": vendor})

    def report(state: Invoice) -> dict[str, Any]:
        v, inv = state["validation"], state["invoice"]
        verdict = "approved" if v["ok"] else "rejected"
        amount = f"{v['total']:.2f} {inv['currency']}"
        text = f"{inv['number']} from {state['vendor']['name']}: {amount}, {verdict}"
        return finish("report", {"report": text})

    builder = StateGraph(Invoice)
    for name, node in [
        ("extract", extract),
        ("validate", validate),
        ("enrich", enrich),
        ("report", report),
    ]:
        builder.add_node(name, node)
    builder.add_edge(START, "extract")
    builder.add_edge("extract", "validate")
    builder.add_edge("validate", "enrich")
    builder.add_edge("enrich", "report")
    builder.add_edge("report", END)
    return builder


def main() -> None:
    ap = argparse.ArgumentParser(description="A graph killed mid-run and resumed elsewhere.")
    ap.add_argument("mode", choices=["run", "resume", "review", "approve"])
    ap.add_argument("url", help="the control plane's URL, such as http://127.0.0.1:7070")
    ap.add_argument("thread")
    ap.add_argument("side_effects")
    ap.add_argument("--crash-in", choices=["extract", "validate", "enrich", "report"])
    ap.add_argument(
        "--answer",
        type=json.loads,
        default=DEFAULT_ANSWER,
        help="approve: the reviewer's answer, as JSON",
    )
    ap.add_argument("--token", default=os.environ.get("BREAKWATER_TOKEN"))
    a = ap.parse_args()

    review = a.mode in ("review", "approve")
    config = {"configurable": {"thread_id": a.thread}}
    with BreakwaterSaver(a.url, token=a.token) as saver:
        graph = build(a.side_effects, a.crash_in, review).compile(checkpointer=saver)
        if a.mode in ("run", "review"):
            graph_input: Any = {"document": DOCUMENT, "done": []}
        elif a.mode == "resume":
            graph_input = None  # continue from the thread's last checkpoint
        else:
            graph_input = Command(resume=a.answer)
        graph.invoke(graph_input, config, durability="sync")
        state = graph.get_state(config)
    print(
        json.dumps(
            {
                "mode": a.mode,
                "thread_id": a.thread,
                "state": state.values,
                "next": list(state.next),
                "interrupts": [i.value for i in state.interrupts],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

"""Proxy benchmarks (not tests): ``python -m tests.bench.bench_proxy [--help]``.

The same Dovecot is reached directly (SASL XOAUTH2 with the token, as a modern client
would) and through ``xoauth2-proxy serve`` in its own process (a password, as a legacy
program would), in one run, with TLS on every connection (:mod:`tests.bench.rig`). Each
figure alternates direct and proxied blocks and prints medians, the ratio proxy / direct
with the spread of the per-block ratios (the machine's noise), and the CPU time each
operation cost the client, the proxy and the upstream (Dovecot and its SMTP relay):

- *login cycle*: connect, TLS, log in, SELECT INBOX, LOGOUT, one after the other;
- *logins/s at 8 concurrent clients*: the same cycle from 8 client processes at once;
- *IMAP FETCH* and *POP3 RETR* of one large message (the relay's throughput);
- *SMTP*: sessions of 100 messages (connect, TLS, log in, then MAIL, RCPT, DATA per
  message, without pipelining, as :mod:`smtplib` does).

The idle-session figures come from :mod:`tests.bench.bench_idle`. README.md's performance
table is copied from the two outputs, with the commands that printed them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypedDict

from tests.bench.clients import Spec
from tests.bench.rig import DOVECOT_TUNING, USER, Cpu, Rig

if TYPE_CHECKING:
    from collections.abc import Sequence

BIG_MESSAGE: Final = 10_800_000
CONCURRENCY: Final = 8


def big_message(size: int = BIG_MESSAGE) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?()[]<>\r\n"
    header = f"From: bench@contoso.com\r\nTo: {USER}\r\nSubject: big\r\n\r\n".encode()
    body = (line * (size // len(line) + 1))[: size - len(header)]
    return header + body.rstrip(b"\r\n") + b"\r\n"


class Result(TypedDict):
    """What a worker answers (see :mod:`tests.bench.clients`)."""

    times: list[float]
    cpu: float
    elapsed: float


class Workers:
    """``count`` client processes running one :class:`Spec` (:mod:`tests.bench.clients`)."""

    def __init__(self, spec: Spec, count: int = 1) -> None:
        argument = json.dumps({name: getattr(spec, name) for name in spec.__slots__})
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.bench.clients", "worker", argument],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        for process in self.processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError(f"a {spec.op} worker did not start")

    def run(self, command: str) -> list[Result]:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(command + "\n")
            process.stdin.flush()
        results: list[Result] = []
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("a worker died")
            results.append(json.loads(line))
        return results

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.write("quit\n")
                process.stdin.close()
        for process in self.processes:
            process.wait(30)


@dataclass(slots=True)
class Block:
    """One block of operations on one side."""

    times: list[float]
    count: int
    elapsed: float
    cpu: Cpu

    @property
    def rate(self) -> float:
        return self.count / self.elapsed


@dataclass(slots=True)
class Side:
    blocks: list[Block] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        return [t for b in self.blocks for t in b.times]

    def median_time(self) -> float:
        return statistics.median(self.times)

    def median_rate(self) -> float:
        return statistics.median(b.rate for b in self.blocks)

    def cpu_per_op(self) -> Cpu:
        """Median over blocks of each party's CPU seconds per operation."""
        per = [b.cpu.per(b.count) for b in self.blocks]
        return Cpu(
            statistics.median(c.client for c in per),
            statistics.median(c.proxy for c in per),
            statistics.median(c.upstream for c in per),
        )


def compare(
    rig: Rig, direct: Workers, proxied: Workers, command: str, blocks: int
) -> tuple[Side, Side]:
    """Run ``command`` on both in alternating blocks (which side goes first alternates
    too); return each side's blocks with the CPU each party spent."""
    sides = (Side(), Side())
    for i in range(blocks):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for index in order:
            workers = (direct, proxied)[index]
            before = rig.cpu()
            results = workers.run(command)
            after = rig.cpu(client=sum(r["cpu"] for r in results))
            times = [t for r in results for t in r["times"]]
            elapsed = max(r["elapsed"] for r in results)
            sides[index].blocks.append(Block(times, len(times), elapsed, after - before))
    return sides


@dataclass(slots=True)
class Figure:
    """One row of the table."""

    name: str
    unit: str
    direct: float
    proxy: float
    #: proxy / direct for times, direct / proxy... no: always "proxy relative to direct"
    #: in the direction where 1.0 is parity and the goal says which side of it is good.
    ratio: float
    spread: tuple[float, float]
    goal: str
    cpu: tuple[Cpu, Cpu]
    ops: str


def _spread(direct: Side, proxy: Side, *, rate: bool) -> tuple[float, float]:
    ratios = []
    for a, b in zip(direct.blocks, proxy.blocks, strict=True):
        if rate:
            ratios.append(b.rate / a.rate)
        else:
            ratios.append(statistics.median(b.times) / statistics.median(a.times))
    return min(ratios), max(ratios)


def _spec(rig: Rig, op: str, protocol: str, *, direct: bool, **extra: object) -> Spec:
    endpoint = rig.endpoint(protocol, direct=direct)
    return Spec(op=op, **endpoint.as_dict(), **extra)  # type: ignore[arg-type]


def measure(rig: Rig, args: argparse.Namespace) -> list[Figure]:
    figures: list[Figure] = []
    wanted = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    def pair(op: str, protocol: str, count: int = 1, **extra: object) -> tuple[Workers, Workers]:
        a = Workers(_spec(rig, op, protocol, direct=True, **extra), count)
        try:
            b = Workers(_spec(rig, op, protocol, direct=False, **extra), count)
        except BaseException:
            a.close()
            raise
        return a, b

    blocks = args.blocks
    resume = args.resume
    if want("cycle"):
        a, b = pair(args.cycle_client, "imap", resume=resume)
        try:
            d, p = compare(rig, a, b, f"run {args.cycles}", blocks)
        finally:
            a.close()
            b.close()
        figures.append(
            Figure(
                "login cycle (connect, TLS, login, SELECT, LOGOUT), sequential",
                "ms",
                d.median_time() * 1e3,
                p.median_time() * 1e3,
                p.median_time() / d.median_time(),
                _spread(d, p, rate=False),
                "<= 1.15x",
                (d.cpu_per_op(), p.cpu_per_op()),
                "login",
            )
        )
    if want("concurrent"):
        a, b = pair("cycle", "imap", CONCURRENCY, resume=resume)
        try:
            d, p = compare(rig, a, b, f"for {args.seconds}", blocks)
        finally:
            a.close()
            b.close()
        figures.append(
            Figure(
                f"logins/s at {CONCURRENCY} concurrent clients",
                "/s",
                d.median_rate(),
                p.median_rate(),
                p.median_rate() / d.median_rate(),
                _spread(d, p, rate=True),
                ">= 0.85x",
                (d.cpu_per_op(), p.cpu_per_op()),
                "login",
            )
        )
    size = BIG_MESSAGE / 1e6
    for name, op, protocol in (("fetch", "fetch", "imap"), ("retr", "retr", "pop3")):
        if not want(name):
            continue
        a, b = pair(op, protocol, expect=BIG_MESSAGE)
        try:
            d, p = compare(rig, a, b, f"run {args.transfers}", blocks)
        finally:
            a.close()
            b.close()
        what = "IMAP FETCH" if protocol == "imap" else "POP3 RETR"
        figures.append(
            Figure(
                f"{what} {size:.1f} MB",
                "MB/s",
                size / d.median_time(),
                size / p.median_time(),
                d.median_time() / p.median_time(),
                tuple(1 / r for r in reversed(_spread(d, p, rate=False))),  # type: ignore[arg-type]
                ">= 0.95x",
                (d.cpu_per_op(), p.cpu_per_op()),
                op,
            )
        )
    if want("smtp"):
        messages = args.messages
        a, b = pair("smtp", "smtp", messages=messages, size=args.message_size)
        try:
            d, p = compare(rig, a, b, "run 1", blocks)
        finally:
            a.close()
            b.close()
        per = messages
        figures.append(
            Figure(
                f"SMTP, {messages} messages of {args.message_size // 1024} KiB per session",
                "msg/s",
                per / d.median_time(),
                per / p.median_time(),
                d.median_time() / p.median_time(),
                tuple(1 / r for r in reversed(_spread(d, p, rate=False))),  # type: ignore[arg-type]
                ">= 0.95x",
                (d.cpu_per_op().per(per), p.cpu_per_op().per(per)),
                "message",
            )
        )
    return figures


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def print_tables(figures: Sequence[Figure], rig: Rig, args: argparse.Namespace) -> None:
    print(
        f"\nlistener certificate: {args.key}; Dovecot: "
        f"{'defaults' if args.dovecot_default else 'tuned (rig.DOVECOT_TUNING)'}; "
        f"clients {'resume' if args.resume else 'do not resume'} TLS sessions; "
        f"{args.blocks} alternating blocks; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| figure | direct | proxy | ratio | block ratios | goal |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in figures:
        print(
            f"| {f.name} | {_number(f.direct)} {f.unit} | {_number(f.proxy)} {f.unit} | "
            f"{f.ratio:.2f}x | {f.spread[0]:.2f}-{f.spread[1]:.2f} | {f.goal} |"
        )
    print("\nCPU milliseconds per operation (medians over blocks):\n")
    print(
        "| operation | client direct | client proxied | proxy | upstream direct "
        "| upstream proxied |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for f in figures:
        d, p = f.cpu
        print(
            f"| {f.name} (per {f.ops}) | {d.client * 1e3:.2f} | {p.client * 1e3:.2f} | "
            f"{p.proxy * 1e3:.2f} | {d.upstream * 1e3:.2f} | {p.upstream * 1e3:.2f} |"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", choices=("ecdsa", "rsa"), default="ecdsa", help="listener key")
    p.add_argument("--resume", action="store_true", help="clients resume TLS sessions")
    p.add_argument(
        "--dovecot-default",
        action="store_true",
        help="Dovecot's default login processes (one per connection: no TLS resumption)",
    )
    p.add_argument("--only", help="comma-separated: cycle,concurrent,fetch,retr,smtp")
    p.add_argument("--blocks", type=int, default=10, help="alternating blocks per figure")
    p.add_argument("--cycles", type=int, default=20, help="login cycles per block")
    p.add_argument("--cycle-client", choices=("cycle", "imaplib-cycle"), default="cycle")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per concurrent block")
    p.add_argument("--transfers", type=int, default=3, help="FETCH/RETR per block")
    p.add_argument("--messages", type=int, default=100, help="SMTP messages per session")
    p.add_argument("--message-size", type=int, default=4096, help="SMTP message bytes")
    p.add_argument("--limits", default="", help="extra lines for the proxy's [limits]")
    p.add_argument("--delay", type=float, default=0.0, help="ms each way to the upstream")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    needs_big = not args.only or {"fetch", "retr"} & set(args.only.split(","))
    with Rig(
        key_type=args.key,
        limits=args.limits.replace("\\n", "\n"),
        dovecot_config="" if args.dovecot_default else DOVECOT_TUNING,
        messages=(big_message(),) if needs_big else (),
        upstream_delay_ms=args.delay,
    ) as rig:
        figures = measure(rig, args)
        print_tables(figures, rig, args)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(
                    [
                        {
                            "name": f.name,
                            "unit": f.unit,
                            "direct": f.direct,
                            "proxy": f.proxy,
                            "ratio": f.ratio,
                            "spread": f.spread,
                            "goal": f.goal,
                            "cpu_direct": [f.cpu[0].client, f.cpu[0].proxy, f.cpu[0].upstream],
                            "cpu_proxy": [f.cpu[1].client, f.cpu[1].proxy, f.cpu[1].upstream],
                        }
                        for f in figures
                    ],
                    out,
                    indent=1,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""tensorboard_check.py — pretrain_gpt's --tensorboard-dir event file, read without TensorFlow.

    /usr/bin/python3 tests/tensorboard_check.py --build BUILD_DIR [--workdir DIR]

1. Runs pretrain_gpt on mock data for 6 iterations (log every 2, evaluate every 3) with
   --tensorboard-dir and --metrics-file.
2. Reads the event file with a reader written from the format alone: TFRecord framing
   (u64le length, u32 masked CRC-32C of the length, data, u32 masked CRC-32C of the data; both
   CRCs checked on every record) and the protobuf wire format decoded by hand.
3. Checks that the first event is file_version "brain.Event:2", that the scalars are exactly
   the expected tags at the expected steps, and that loss, lr and eval loss equal the JSON
   metrics (as float32).
4. Flips one byte in a copy of the file (in a length, in a record's data, in a data CRC) and
   checks that the reader rejects each copy with a CRC mismatch.
Prints what it checked; exits 1 if anything did not hold.
"""

import argparse
import glob
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

TRAIN_ITERS, LOG_INTERVAL, EVAL_INTERVAL = 6, 2, 3
TRAIN_TAGS = ["train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "perf/mfu",
              "memory/peak_mib"]
EVAL_TAGS = ["eval/loss"]
FLAGS = ["--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr",
         "1e-4", "--lr-warmup-iters", "2", "--num-threads", "1", "--train-iters", str(TRAIN_ITERS), "--log-interval",
         str(LOG_INTERVAL), "--eval-interval", str(EVAL_INTERVAL), "--eval-iters", "1"]


class CRCError(ValueError):
    pass


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(blob):
    """TFRecord framing -> list of data payloads; CRCError on any checksum mismatch."""
    records, pos = [], 0
    while pos < len(blob):
        if pos + 12 > len(blob):
            raise ValueError(f"truncated record header at byte {pos}")
        length_bytes = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked_crc32c(length_bytes) != length_crc:
            raise CRCError(f"record {len(records)} at byte {pos}: length CRC mismatch")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(blob):
            raise ValueError(f"record {len(records)} at byte {pos}: {length} bytes run past the end of the file")
        data = blob[start:end]
        (data_crc,) = struct.unpack("<I", blob[end:end + 4])
        if masked_crc32c(data) != data_crc:
            raise CRCError(f"record {len(records)} at byte {pos}: data CRC mismatch")
        records.append(data)
        pos = end + 4
    return records


def read_varint(buf, pos):
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def decode_message(buf):
    """Protobuf wire format -> {field number: [raw values]} (ints, bytes for fixed and length-delimited)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} (field {field})")
        fields.setdefault(field, []).append(value)
    return fields


def decode_event(data):
    """Event{wall_time=1 double, step=2 varint, file_version=3 string, summary=5 {value=1 {tag=1, simple_value=2}}}."""
    f = decode_message(data)
    event = {"wall_time": struct.unpack("<d", f[1][0])[0] if 1 in f else None, "step": f.get(2, [0])[0],
             "file_version": f[3][0].decode() if 3 in f else None, "values": []}
    for summary in f.get(5, []):
        for value in decode_message(summary).get(1, []):
            v = decode_message(value)
            event["values"].append((v[1][0].decode(), struct.unpack("<f", v[2][0])[0]))
    return event


def read_events(blob):
    return [decode_event(r) for r in read_records(blob)]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", required=True, help="the CMake build directory (examples/pretrain_gpt)")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory, removed)")
    args = parser.parse_args()
    failures = []

    def check(ok, what):
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    check(crc32c(b"123456789") == 0xE3069283, "CRC-32C of '123456789' is 0xE3069283")

    with tempfile.TemporaryDirectory(prefix="lightron_tb.") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        tb_dir, metrics_file = os.path.join(work, "tb"), os.path.join(work, "metrics.jsonl")
        for old in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
            os.remove(old)
        cmd = [os.path.join(args.build, "examples", "pretrain_gpt"), *FLAGS, "--tensorboard-dir", tb_dir,
               "--metrics-file", metrics_file]
        print("$", " ".join(cmd))
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            print(run.stdout, run.stderr)
            print(f"FAIL  pretrain_gpt exited with {run.returncode}")
            return 1
        files = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
        check(len(files) == 1, f"one event file in {tb_dir} (found {[os.path.basename(f) for f in files]})")
        if len(files) != 1:
            return 1
        blob = open(files[0], "rb").read()
        try:
            events = read_events(blob)
        except ValueError as e:
            print(f"FAIL  the written file does not read back: {e}")
            return 1
        print(f"read {len(events)} records ({len(blob)} bytes), every length and data CRC matched")

        check(events[0]["file_version"] == "brain.Event:2" and not events[0]["values"],
              f"first event: file_version {events[0]['file_version']!r}")
        scalars, repeated = {}, []  # (tag, step) -> value
        for e in events[1:]:
            for tag, value in e["values"]:
                if (tag, e["step"]) in scalars:
                    repeated.append((tag, e["step"]))
                scalars[(tag, e["step"])] = value
        check(all(len(e["values"]) == 1 for e in events[1:]), "one scalar per event after the first")
        check(not repeated, f"each (tag, step) written once (repeated: {repeated})")
        steps = [e["step"] for e in events[1:]]
        check(steps == sorted(steps), f"steps in order: {steps}")
        check(all(abs(e["wall_time"] - events[0]["wall_time"]) < 3600 for e in events),
              "wall times within an hour of the first event")
        expected = {(t, s) for t in TRAIN_TAGS for s in range(LOG_INTERVAL, TRAIN_ITERS + 1, LOG_INTERVAL)}
        expected |= {(t, s) for t in EVAL_TAGS for s in range(EVAL_INTERVAL, TRAIN_ITERS + 1, EVAL_INTERVAL)}
        check(set(scalars) == expected, f"tags x steps as expected: missing {sorted(expected - set(scalars))}, "
              f"unexpected {sorted(set(scalars) - expected)}")
        check(all(math.isfinite(v) for v in scalars.values()), "every value finite")

        for line in open(metrics_file):
            m = json.loads(line)
            pairs = [("train/loss", "loss"), ("train/lr", "lr"), ("eval/loss", "eval_loss")]
            for tag, key in pairs:
                if key in m and (tag, m["iteration"]) in scalars:
                    got, want = scalars[(tag, m["iteration"])], f32(m[key])
                    check(abs(got - want) <= 1e-6 * abs(want), f"{tag} at {m['iteration']}: {got:.7g} (JSON {want:.7g})")

        # Corruption: each copy has one flipped byte and must be refused with a CRC mismatch.
        second = 8 + 4 + len(read_records(blob)[0]) + 4  # where the second record starts
        positions = {"a length byte": second, "a data byte": len(blob) - 10, "a data CRC byte": len(blob) - 2}
        for where, pos in positions.items():
            broken = bytearray(blob)
            broken[pos] ^= 0x01
            copy = os.path.join(work, "corrupt.tfevents")
            with open(copy, "wb") as f:
                f.write(broken)
            try:
                read_events(open(copy, "rb").read())
                check(False, f"flipped {where} (byte {pos}): NOT detected")
            except CRCError as e:
                check(True, f"flipped {where} (byte {pos}): rejected ({e})")
            except ValueError as e:
                check(False, f"flipped {where} (byte {pos}): rejected, but not by a CRC ({e})")

    print(f"{len(failures)} failure(s)" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

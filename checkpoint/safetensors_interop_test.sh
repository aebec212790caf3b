#!/usr/bin/env bash
# Cross-checks tessera's safetensors code against an independent reader and writer written from the
# format description in Python's standard library only (json, struct): a file tessera writes must
# parse there with the expected names, shapes and values, and a file Python writes (unpadded
# header, keys out of data order, misaligned tensors) must read back in tessera exactly.
set -euo pipefail
helper=checkpoint/safetensors_interop_helper
tmp=${TEST_TMPDIR:-$(mktemp -d)}

"$helper" write "$tmp/from_cpp.safetensors"

python3 - "$tmp/from_cpp.safetensors" <<'PY'
import json, struct, sys

data = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<Q", data[:8])
assert (8 + n) % 8 == 0, f"data section starts at {8 + n}, not a multiple of 8"
raw = data[8:8 + n].decode("utf-8")
assert raw.rstrip(" ").endswith("}") and set(raw[len(raw.rstrip(" ")):]) <= {" "}, repr(raw)
header = json.loads(raw)
body = data[8 + n:]
assert header.pop("__metadata__") == {"format": "pt", "source": "tessera"}

def bf16(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]

decode = {
    "F32": lambda b: list(struct.unpack(f"<{len(b) // 4}f", b)),
    "F16": lambda b: list(struct.unpack(f"<{len(b) // 2}e", b)),
    "BF16": lambda b: [bf16(x) for x in struct.unpack(f"<{len(b) // 2}H", b)],
    "I32": lambda b: list(struct.unpack(f"<{len(b) // 4}i", b)),
    "I64": lambda b: list(struct.unpack(f"<{len(b) // 8}q", b)),
}
size = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}
expected = {
    "f32": ("F32", [2, 3], [i * 0.5 - 1.25 for i in range(6)]),
    "bf16": ("BF16", [4], [1.0, -2.5, 0.15625, 384.0]),
    "f16": ("F16", [2, 2], [i * 0.25 - 0.5 for i in range(4)]),
    "i32": ("I32", [3], [-7, 0, 2147483647]),
    "i64": ("I64", [], [-9007199254740993]),
    "empty": ("F32", [0, 5], []),
}
assert list(header) == list(expected), list(header)  # written in the given order
offset = 0
for name, (dtype, shape, values) in expected.items():
    e = header[name]
    assert e["dtype"] == dtype and e["shape"] == shape, (name, e)
    numel = 1
    for d in shape:
        numel *= d
    begin, end = e["data_offsets"]
    assert begin == offset and end - begin == numel * size[dtype], (name, e)
    got = decode[dtype](body[begin:end])
    assert got == values, (name, got, values)
    offset = end
assert offset == len(body), (offset, len(body))
print("python read tessera's file: ok")
PY

# The reverse: Python writes, tessera reads.
python3 - "$tmp/from_py.safetensors" "$tmp/expected.txt" <<'PY'
import json, struct, sys

tensors = [  # (name, dtype, shape, packed bytes); laid out in this order, no padding anywhere
    ("z_odd", "BF16", [3], struct.pack("<3H", 0x3F80, 0xC020, 0x4300)),  # 1, -2.5, 128
    ("a_f32", "F32", [2, 2], struct.pack("<4f", 0.5, -1.0, 3.25, 1e-3)),
    ("scalar", "I64", [], struct.pack("<q", -(2**62) - 3)),
    ("m_f16", "F16", [1, 3], struct.pack("<3e", 0.099975586, -65504.0, 6.1035156e-05)),
    ("ids", "I32", [4], struct.pack("<4i", 1, -1, 2**31 - 1, -(2**31))),
    ("none", "F16", [2, 0], b""),
]
header, body = {}, b""
for name, dtype, shape, raw in tensors:
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
    body += raw
header["__metadata__"] = {"origin": "python", "empty": ""}
# Sorted keys put the metadata last and the tensors out of data order; no padding, and the header
# length is odd, so every tensor is misaligned.
text = json.dumps(header, sort_keys=True).encode()
if len(text) % 2 == 0:
    text += b" "
open(sys.argv[1], "wb").write(struct.pack("<Q", len(text)) + text + body)

def fmt(v):
    return "%.9g" % v

lines = ["meta empty ", "meta origin python"]
values = {
    "z_odd": [1.0, -2.5, 128.0],
    "a_f32": list(struct.unpack("<4f", tensors[1][3])),
    "scalar": [-(2**62) - 3],
    "m_f16": list(struct.unpack("<3e", tensors[3][3])),
    "ids": [1, -1, 2**31 - 1, -(2**31)],
    "none": [],
}
for name, dtype, shape, _ in sorted(tensors):
    dims = ",".join(str(d) for d in shape) or "-"
    vals = [str(v) if dtype.startswith("I") else fmt(v) for v in values[name]]
    lines.append(" ".join([name, dtype, dims] + vals))
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
PY

"$helper" dump "$tmp/from_py.safetensors" > "$tmp/got.txt"
if ! diff -u "$tmp/expected.txt" "$tmp/got.txt"; then
  echo "FAIL: tessera's reading of the Python-written file differs (above)"
  exit 1
fi
echo "tessera read python's file: ok"

# A truncated copy must fail with a message naming the file, not crash.
head -c 40 "$tmp/from_py.safetensors" > "$tmp/cut.safetensors"
if out=$("$helper" dump "$tmp/cut.safetensors" 2>&1); then
  echo "FAIL: truncated file accepted"; exit 1
fi
echo "$out" | grep -q "$tmp/cut.safetensors" || { echo "FAIL: error lacks the path: $out"; exit 1; }
echo "PASS"

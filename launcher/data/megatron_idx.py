#!/usr/bin/env python3
"""Reads a Megatron-LM indexed dataset (<prefix>.idx/.bin) with the standard library only.

An independent check of the C++ writer: it follows megatron/core/datasets/indexed_dataset.py's
_IndexReader field by field (struct instead of numpy) and the layout its _IndexWriter produces
(sequence pointers are the running byte offsets of the sequences in .bin). Prints a summary line;
exits non-zero with a message on the first inconsistency.

  python3 megatron_idx.py PREFIX [--eos ID] [--vocab N]
"""
import argparse
import array
import os
import struct
import sys

_INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes -> (name, bytes, array typecode).
_DTYPES = {
    1: ("uint8", 1, "B"),
    2: ("int8", 1, "b"),
    3: ("int16", 2, "h"),
    4: ("int32", 4, "i"),
    5: ("int64", 8, "q"),
    6: ("float64", 8, "d"),
    7: ("float32", 4, "f"),
    8: ("uint16", 2, "H"),
}


def fail(message):
    sys.exit("megatron_idx: " + message)


def read_index(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:9] != _INDEX_HEADER:
        fail(f"{path}: bad magic {data[:9]!r}")
    (version,) = struct.unpack_from("<Q", data, 9)
    if version != 1:
        fail(f"{path}: version {version}")
    (code,) = struct.unpack_from("<B", data, 17)
    if code not in _DTYPES:
        fail(f"{path}: dtype code {code}")
    sequence_count, document_count = struct.unpack_from("<QQ", data, 18)
    offset = 34
    lengths = struct.unpack_from(f"<{sequence_count}i", data, offset)
    offset += 4 * sequence_count
    pointers = struct.unpack_from(f"<{sequence_count}q", data, offset)
    offset += 8 * sequence_count
    document_indices = struct.unpack_from(f"<{document_count}q", data, offset)
    offset += 8 * document_count
    if offset != len(data):
        fail(f"{path}: {len(data)} bytes, fields end at {offset}")
    return code, lengths, pointers, document_indices


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix")
    parser.add_argument("--eos", type=int, default=None, help="every document must end with it")
    parser.add_argument("--vocab", type=int, default=None, help="every token must be below it")
    args = parser.parse_args()
    code, lengths, pointers, doc_idx = read_index(args.prefix + ".idx")
    name, size, typecode = _DTYPES[code]

    # _IndexWriter._sequence_pointers: running byte offsets.
    expected, running = [], 0
    for n in lengths:
        expected.append(running)
        running += n * size
    if list(pointers) != expected:
        fail("sequence pointers are not the running byte offsets of the lengths")
    bin_path = args.prefix + ".bin"
    if os.path.getsize(bin_path) != running:
        fail(f"{bin_path}: {os.path.getsize(bin_path)} bytes, the index covers {running}")
    if not doc_idx or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
        fail("document indices must run from 0 to the sequence count")
    if any(b < a for a, b in zip(doc_idx, doc_idx[1:])):
        fail("document indices decrease")

    tokens = array.array(typecode)
    with open(bin_path, "rb") as f:
        tokens.frombytes(f.read())
    if sys.byteorder != "little":
        tokens.byteswap()
    for d in range(len(doc_idx) - 1):
        first, last = doc_idx[d], doc_idx[d + 1]
        if args.eos is not None:
            if last == first or lengths[last - 1] == 0:
                fail(f"document {d} has no tokens")
            end = pointers[last - 1] // size + lengths[last - 1]
            if tokens[end - 1] != args.eos:
                fail(f"document {d} ends with {tokens[end - 1]}, not EOS {args.eos}")
    if args.vocab is not None and len(tokens) and (min(tokens) < 0 or max(tokens) >= args.vocab):
        fail(f"token ids span [{min(tokens)}, {max(tokens)}], outside [0, {args.vocab})")
    print(f"{args.prefix}: {name}, {len(doc_idx) - 1} documents, {len(lengths)} sequences, "
          f"{len(tokens)} tokens")


if __name__ == "__main__":
    main()

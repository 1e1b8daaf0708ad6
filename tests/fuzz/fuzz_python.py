"""atheris harness over the Python entry points that read untrusted bytes: a stream
(CompressedTensor.from_bytes, decode) and an expert file (CompressedExpert.from_bytes, then every
tensor decoded). Anything but CompeftError (or its subclass DecodeLimitError) is a finding.

    python tests/fuzz/fuzz_python.py CORPUS_DIR -max_total_time=1800

Seeds: tests/golden/*.cpft and rust/fuzz/corpus/expert/.
"""

import sys
import zlib

import atheris

with atheris.instrument_imports():
    import compeft_rs
    from compeft_rs import CompeftError, CompressedExpert, CompressedTensor

compeft_rs.set_max_numel(1 << 20)


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    try:
        if mode & 1:
            e = CompressedExpert.from_bytes(rest)
            for name in e.keys():
                e.decode_tensor(name)
        else:
            if mode & 2 and len(rest) >= 4:
                # Rewrite the checksum so that mutations reach the structural checks behind it.
                rest = rest[:-4] + zlib.crc32(rest[:-4]).to_bytes(4, "little")
            t = CompressedTensor.from_bytes(rest)
            t.decode()
    except CompeftError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

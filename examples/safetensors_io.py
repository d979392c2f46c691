"""safetensors files with nothing but torch: save_file / load_file, the same layout as the
`safetensors` package writes (8-byte little-endian header length, JSON header, raw bytes), for
the examples and the tests. With the `safetensors` package installed, safetensors.torch.save_file
writes files autotune reads the same way."""
import json
import struct

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
NAMES = {v: k for k, v in DTYPES.items()}


def save_file(tensors, path, metadata=None):
    """tensors: {name: tensor}; every tensor's first dimension is the sample count."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        # The tensor's bytes through a bytearray it is copied into (bytes(storage) would walk
        # them one by one in Python).
        blob = bytearray(t.numel() * t.element_size())
        if blob:
            torch.frombuffer(blob, dtype=torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def load_file(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        t = torch.frombuffer(raw, dtype=NAMES[e["dtype"]]) if raw else torch.empty(
            0, dtype=NAMES[e["dtype"]])
        out[name] = t.reshape(e["shape"])
    return out

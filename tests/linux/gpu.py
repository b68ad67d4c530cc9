"""Host side of the virtio-gpu check in scripts/vhost-qemu-test (Pillow from the test venv).

  pattern W H SEED OUT       random XRGB8888 pixels (X = 0), W*H*4 bytes, into OUT
  ctl SOCKET LINE            one request to `ray device serve gpu --control`; the answer
  check PNG PATTERN W H      "match", or where the first pixel differs
"""
import random
import socket
import sys

cmd = sys.argv[1]
if cmd == "pattern":
    w, h, seed = map(int, sys.argv[2:5])
    px = bytearray(random.Random(seed).randbytes(w * h * 4))
    px[3::4] = bytes(w * h)
    with open(sys.argv[5], "wb") as f:
        f.write(px)
elif cmd == "ctl":
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[2])
    s.sendall(sys.argv[3].encode() + b"\n")
    print(s.makefile().readline().strip())
elif cmd == "check":
    from PIL import Image

    w, h = int(sys.argv[4]), int(sys.argv[5])
    got = Image.open(sys.argv[2])
    if got.size != (w, h):
        print(f"size {got.size[0]}x{got.size[1]}, not {w}x{h}")
        sys.exit()
    got = got.convert("RGB").tobytes()
    with open(sys.argv[3], "rb") as f:
        raw = f.read()
    want = Image.frombuffer("RGB", (w, h), raw, "raw", "BGRX", 0, 1).tobytes()
    if got == want:
        print("match")
    else:
        bad = [i for i in range(0, len(want), 3) if got[i : i + 3] != want[i : i + 3]]
        i = bad[0] // 3
        print(
            f"{len(bad)} pixels differ; first at ({i % w},{i // w}): "
            f"{got[3 * i : 3 * i + 3].hex()} instead of {want[3 * i : 3 * i + 3].hex()}"
        )
else:
    sys.exit(f"unknown command {cmd!r}")

"""A still picture as a Y4M video: Chromium's fake camera (--use-file-for-fake-video-capture)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def png_to_y4m(
    png: bytes, path: Path, width: int = 960, height: int = 720, frames: int = 2
) -> None:
    """Write ``png`` scaled up (whole pixels per pixel), centred on white, as 4:2:0 frames.

    The picture keeps at least a tenth of the frame as white margin around it: a quiet zone
    for a QR code even if its own border were cropped. Luma is studio range (16..235), as
    a camera's would be; chroma is neutral (a grey picture).
    """
    picture = Image.open(io.BytesIO(png)).convert("L")
    room = int(min(width, height) * 0.8)
    factor = max(1, room // max(picture.size))
    picture = picture.resize(
        (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
    )
    frame = Image.new("L", (width, height), 255)
    frame.paste(picture, ((width - picture.width) // 2, (height - picture.height) // 2))
    luma = bytes(16 + (219 * v + 127) // 255 for v in range(256))
    y_plane = frame.tobytes().translate(luma)
    chroma = bytes([128]) * ((width // 2) * (height // 2))
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for _ in range(frames):
            out.write(b"FRAME\n")
            out.write(y_plane)
            out.write(chroma)
            out.write(chroma)

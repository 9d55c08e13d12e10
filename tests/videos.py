"""Test videos written with PyAV: the astronaut photograph that scikit-image ships (public domain) moving over a plain background,
with stretches of frames without a face, and files that are not videos (audio only, corrupt)."""
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np
from skimage import data

PHOTO_FACE = (176.0, 64.0, 98.0, 98.0)  # the face in the 512×512 photograph (x, y, w, h), marked by hand: brows to chin

ENCODER_OPTIONS = {  # good quality, fast, quiet
    "libx264": {"crf": "18", "preset": "veryfast"},
    "libx265": {"crf": "20", "preset": "ultrafast", "x265-params": "log-level=none"},
    "libvpx-vp9": {"crf": "28", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "10", "b": "2M", "deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {"b": "4M"},
}


@lru_cache(maxsize=1)
def _photo_and_mask():
    "The photograph (float32 RGB) and a feathered ellipse around its face (head and neck), to paste it onto a background."
    photo = data.astronaut().astype(np.float32)
    x, y, w, h = PHOTO_FACE
    mask = np.zeros(photo.shape[:2], np.float32)
    cv2.ellipse(mask, (round(x + w / 2), round(y + h * 0.55)), (round(w * 0.85), round(h * 1.05)), 0, 0, 360, 1.0, -1)
    return photo, cv2.GaussianBlur(mask, (0, 0), 6)[..., None]


def background(size=(320, 240), seed=0) -> np.ndarray:
    "A plain textured background (H, W, 3) uint8: a soft colour gradient with blurred noise, the same in every frame."
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.uniform(90, 170, 3)
    ramp = np.linspace(-25, 25, w)[None, :, None] * rng.choice([-1, 1], 3)
    blobs = cv2.GaussianBlur(rng.normal(0, 60, (h, w, 3)).astype(np.float32), (0, 0), 9)
    grain = rng.normal(0, 3, (h, w, 3))
    return np.clip(base + ramp + blobs + grain, 0, 255).astype(np.uint8)


def _in_empty(n, empty): return any(a <= n <= b for a, b in empty)


def face_frames(n_frames=60, size=(320, 240), empty=((20, 30),), seed=0) -> tuple[list[np.ndarray], list[tuple | None]]:
    """RGB frames of `size` (w, h): the astronaut's head moving along a smooth path over `background` and scaling a little
    (face side 0.27–0.35 of the frame height); frames whose 1-based number lies in an `empty` range (inclusive) show only the
    background. Returns the frames and, per frame, the true face box (x, y, w, h) in frame pixels, or None."""
    w, h = size
    photo, mask = _photo_and_mask()
    bg = background(size, seed).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    phase = rng.uniform(0, 2 * np.pi, 3)
    px, py, pw, _ = PHOTO_FACE
    frames, boxes = [], []
    for n in range(1, n_frames + 1):
        if _in_empty(n, empty):
            frames.append(bg.astype(np.uint8)); boxes.append(None); continue
        t = 2 * np.pi * (n - 1) / max(n_frames, 2)
        side = h * (0.31 + 0.04 * np.sin(t + phase[0]))
        cx = w / 2 + 0.15 * w * np.sin(t + phase[1])
        cy = h / 2 + 0.08 * h * np.sin(2 * t + phase[2])
        k = side / pw
        x0, y0 = cx - side / 2, cy - side / 2
        m = np.float32([[k, 0, x0 - k * px], [0, k, y0 - k * py]])  # photo pixel edges -> frame pixel edges
        m[:, 2] += 0.5 * (k - 1)  # the same map for pixel centres, as warpAffine reads them
        face = cv2.warpAffine(photo, m, (w, h), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(mask, m, (w, h))[..., None]
        frames.append(np.clip(bg * (1 - alpha) + face * alpha, 0, 255).astype(np.uint8))
        boxes.append((x0, y0, side, side))
    return frames, boxes


def write_video(path, frames, fps=25, codec="libx264", pix_fmt="yuv420p", rotation=None, options=None,
                container_options=None) -> Path:
    """Write RGB `frames` to `path` with PyAV (`codec`, `pix_fmt`, encoder `options` or `ENCODER_OPTIONS`, muxer
    `container_options`); `rotation`: degrees counter-clockwise a player turns the picture, written as the stream's display
    matrix (PyAV >= 18)."""
    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps, options=options if options is not None else ENCODER_OPTIONS.get(codec, {}))
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if rotation is not None: s.set_display_rotation(rotation)
        for im in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(im), format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def write_face_video(path, n_frames=60, size=(320, 240), empty=((20, 30),), fps=25, codec="libx264", seed=0) -> list:
    "Write `face_frames(n_frames, size, empty, seed)` to `path`; returns the true face box of each frame (None on empty frames)."
    frames, boxes = face_frames(n_frames, size, empty, seed)
    write_video(path, frames, fps, codec)
    return boxes


def write_audio_only(path, seconds=0.5, rate=16000) -> Path:
    "An audio file without a video stream (AAC in .m4a, or PCM in .wav, by `path`'s suffix): a 440 Hz tone of `seconds`."
    path = Path(path)
    codec = "pcm_s16le" if path.suffix.lower() == ".wav" else "aac"
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        for p in s.encode(frame): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def write_corrupt(path, seed=0) -> Path:
    "A file named like a video that is not one: the first 1 KiB of a real MP4 (its header box) followed by random bytes."
    path = Path(path)
    real = write_video(path.with_name(path.stem + ".real.mp4"), face_frames(5)[0])
    head = real.read_bytes()[:1024]
    real.unlink()
    path.write_bytes(head + np.random.default_rng(seed).integers(0, 256, 16384, dtype=np.uint8).tobytes())
    return path

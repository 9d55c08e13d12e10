"""Decoding, detecting, tracking and cropping on videos the tests write with PyAV (frames made from the public-domain astronaut
photograph of scikit-image): numbering and times, codecs against the source and against OpenCV's own decoder, rotation, stills,
the errors, seeking, and faces found, followed and cropped."""
import re

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from affect_nb.decode import (DECODER, IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoError, find_videos, frames, probe, read_frame)
from affect_nb.detect import (ARCFACE_TEMPLATE, DETECTORS, Face, HaarDetector, crop_face, crop_matrix, detect_faces,
                              main_subject, make_detector, track_faces)
from videos import background, face_frames, write_audio_only, write_corrupt, write_face_video, write_video

TRACK_COLUMNS = ["frame", "face_id", "x", "y", "w", "h", "det_score", "detected"] + [f"lm{i}_{a}" for i in range(5) for a in "xy"]
CAN_ROTATE = hasattr(av.video.stream.VideoStream, "set_display_rotation")  # writing a display matrix needs PyAV >= 18


def iou(a, b) -> float:
    "Intersection over union of two boxes (x, y, w, h), written out here independently of the package."
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def opencv_frames(path):
    "Every frame of `path` as OpenCV's VideoCapture (its own FFmpeg build, rotating automatically) decodes it, as RGB."
    cap, out = cv2.VideoCapture(str(path)), []
    while True:
        ok, im = cap.read()
        if not ok: return out
        out.append(im[..., ::-1])


@pytest.fixture(scope="module")
def source():
    return face_frames(30, empty=((10, 12),))


# --- decoding ----------------------------------------------------------------------------------------------------------------

def test_frames_are_numbered_timed_and_one_per_decoded_frame(tmp_path, source):
    path = write_video(tmp_path / "clip.mp4", source[0], fps=25)
    got = list(frames(path))
    assert [f.number for f in got] == list(range(1, 31))
    times = np.array([f.time_s for f in got])
    assert (np.diff(times) > 0).all() and np.allclose(times, np.arange(30) / 25, atol=1e-6)
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in got)
    info = probe(path)
    assert (info.width, info.height, info.fps, info.n_frames_header, info.rotation, info.codec, info.still) == \
           (320, 240, 25.0, 30, 0, "h264", False)
    assert DECODER.startswith(f"PyAV {av.__version__} (FFmpeg ")


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.mov", "libx265"), ("clip.webm", "libvpx-vp9"),
                                        ("clip.avi", "mpeg4")])
def test_containers_and_codecs_decode_to_the_same_pictures(tmp_path, source, name, codec):
    path = write_video(tmp_path / name, source[0][:12], codec=codec)
    got = [f.image for f in frames(path)]
    assert len(got) == 12
    for g, s in zip(got, source[0]): assert np.abs(g.astype(int) - s).mean() < 6  # the source, within the codec's loss
    for g, r in zip(got, opencv_frames(path)): assert np.abs(g.astype(int) - r).mean() < 0.5  # another FFmpeg reader


def test_size_shrinks_by_area_and_keep_skips_the_conversion(tmp_path, source):
    path = write_video(tmp_path / "clip.mp4", source[0][:6])
    full = [f.image for f in frames(path)]
    small = list(frames(path, size=160, keep=lambda n: n % 2 == 1))
    assert [f.image is None for f in small] == [False, True] * 3
    assert small[0].image.shape == (120, 160, 3)
    ref = cv2.resize(full[0], (160, 120), interpolation=cv2.INTER_AREA)
    assert np.abs(small[0].image.astype(int) - ref).mean() < 1.5
    assert [f.time_s for f in small] == [f.time_s for f in frames(path)]


def test_the_header_count_is_not_trusted(tmp_path):
    "A fast-start mp4 (header first) cut to 60 % of its bytes: the header says 40 frames, fewer decode, all numbered."
    noise = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(40)]
    whole = write_video(tmp_path / "whole.mp4", noise, container_options={"movflags": "faststart"}).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[:int(len(whole) * 0.6)])
    got = list(frames(tmp_path / "cut.mp4"))
    assert probe(tmp_path / "cut.mp4").n_frames_header == 40 and 5 < len(got) < 40
    assert [f.number for f in got] == list(range(1, len(got) + 1))
    assert all(a.time_s < b.time_s for a, b in zip(got, got[1:]))


def test_a_damaged_packet_is_skipped_with_a_warning_naming_the_file(tmp_path):
    "The 21st packet of an h264 mp4 overwritten with zeros (its length prefix kept): the decoder rejects it, the rest decodes."
    noise = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(40)]
    data = bytearray(write_video(tmp_path / "ok.mp4", noise).read_bytes())
    with av.open(str(tmp_path / "ok.mp4")) as c:
        pos, size = [(q.pos, q.size) for q in c.demux(video=0) if q.size][20]
    data[pos + 4:pos + size] = bytes(size - 4)
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"damaged\.mp4: skipped 1 damaged packet"):
        got = list(frames(tmp_path / "damaged.mp4"))
    assert len(got) == 39 and [f.number for f in got] == list(range(1, 40))
    steps = np.round(np.diff([f.time_s for f in got]) * 25, 6)
    assert sorted(steps)[-2:] == [1, 2] and steps.min() == 1  # one frame lost: one step of two frames in time


@pytest.mark.skipif(not CAN_ROTATE, reason="writing a display matrix needs PyAV >= 18")
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_is_respected(tmp_path, source, degrees):
    path = write_video(tmp_path / f"turned{degrees}.mp4", source[0][:3], rotation=degrees)
    info = probe(path)
    assert info.rotation == degrees and (info.width, info.height) == ((320, 240) if degrees == 180 else (240, 320))
    got = [f.image for f in frames(path)]
    assert np.abs(got[0].astype(int) - np.rot90(source[0][0], degrees // 90)).mean() < 4  # turned counter-clockwise
    assert np.array_equal(got[0], opencv_frames(path)[0])  # as OpenCV's automatic rotation turns it
    assert np.array_equal(read_frame(path, 2), got[1])


def test_a_still_image_is_one_frame_upright_by_its_exif_orientation(tmp_path, source):
    img = source[0][0]
    Image.fromarray(img).save(tmp_path / "still.png")
    (f,) = list(frames(tmp_path / "still.png"))
    assert (f.number, f.time_s) == (1, 0.0) and np.array_equal(f.image, img)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (g,) = list(frames(tmp_path / "phone.jpg"))
    assert g.image.shape == (320, 240, 3) and np.abs(g.image.astype(int) - np.rot90(img, -1)).mean() < 3
    assert np.array_equal(g.image, cv2.imread(str(tmp_path / "phone.jpg"))[..., ::-1])  # OpenCV applies EXIF orientation too
    info = probe(tmp_path / "phone.jpg")
    assert (info.width, info.height, info.rotation, info.still, info.n_frames_header) == (240, 320, 270, True, 1)
    assert next(frames(tmp_path / "phone.jpg", size=160)).image.shape == (160, 120, 3)


def test_unreadable_files_are_errors_naming_them(tmp_path):
    write_audio_only(tmp_path / "tone.m4a")
    write_corrupt(tmp_path / "corrupt.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8" + bytes(300))
    header = write_video(tmp_path / "h.avi", face_frames(10)[0], codec="mpeg4").read_bytes()[:300]
    (tmp_path / "headless.avi").write_bytes(header + np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases = [("missing.mp4", FileNotFoundError, "missing.mp4"),
             ("tone.m4a", VideoError, r"tone\.m4a has no video stream \(it holds: audio\)"),
             ("corrupt.mp4", VideoError, r"cannot open .*corrupt\.mp4: "), ("empty.mp4", VideoError, r"cannot open .*empty\.mp4"),
             ("notes.mp4", VideoError, r"cannot open .*notes\.mp4"), ("broken.jpg", VideoError, r"cannot open .*broken\.jpg"),
             ("headless.avi", VideoError, r"headless\.avi: no frame could be decoded"), (".", VideoError, "is a folder")]
    for name, kind, message in cases:
        for read in (probe, lambda p: list(frames(p)), lambda p: read_frame(p, 1)):
            with pytest.raises(kind, match=message): read(tmp_path / name)
    assert issubclass(VideoError, ValueError)


def test_read_frame_gives_exactly_the_numbered_frame(tmp_path, source):
    "Seeking in videos with a keyframe every 8 frames and B-frames (h264), and with open GOPs (hevc), against a full decode."
    for name, codec, options in [("gop.mp4", "libx264", {"g": "8", "bf": "3"}),
                                 ("gop.mov", "libx265", {"preset": "ultrafast",
                                                         "x265-params": "log-level=none:keyint=8:min-keyint=8:open-gop=1:bframes=3"})]:
        path = write_video(tmp_path / name, source[0], codec=codec, options=options)
        every = [f.image for f in frames(path)]
        for k in (1, 2, 8, 9, 15, 23, 30): assert np.array_equal(read_frame(path, k), every[k - 1]), (name, k)
        with pytest.raises(ValueError, match=f"{re.escape(name)} has 30 frames: frame 31 is past the last one"): read_frame(path, 31)
        with pytest.raises(ValueError, match="numbered from 1"): read_frame(path, 0)
    fresh = write_video(tmp_path / "fresh.mp4", source[0][:9], options={"g": "4"})  # not decoded before in this process
    assert np.array_equal(read_frame(fresh, 7), [f.image for f in frames(fresh)][6])


def test_find_videos(tmp_path):
    for name in ("b.MP4", "a.jpg", "c.txt", ".hidden", "sub/d.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_videos(tmp_path)] == ["a.jpg", "b.MP4"]
    assert [p.name for p in find_videos([tmp_path / "c.txt", tmp_path, tmp_path / "a.jpg", str(tmp_path / "c.txt")])] == \
           ["c.txt", "a.jpg", "b.MP4"]
    with pytest.raises(FileNotFoundError, match="nothere"): find_videos([tmp_path, tmp_path / "nothere"])
    assert ".mp4" in VIDEO_SUFFIXES and ".png" in IMAGE_SUFFIXES and not set(VIDEO_SUFFIXES) & set(IMAGE_SUFFIXES)


# --- detecting and tracking --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("faces") / "astronaut.mp4"
    return path, write_face_video(path, n_frames=60, size=(320, 240), empty=((20, 30),))


@pytest.mark.parametrize("every", [1, 5])
def test_faces_are_found_and_followed_on_the_face_frames_only(face_video, every):
    path, truth = face_video
    detections, n_frames, times = detect_faces(path, HaarDetector(), every=every, progress=False)
    assert (n_frames, len(times)) == (60, 60)
    assert set(range(1, 61, every)) <= set(detections) <= set(range(1, 61, every)) | {60}  # (the last frame may be looked at too)
    assert all(bool(detections[n]) == (truth[n - 1] is not None) for n in detections)  # every detection frame right
    main = main_subject(track_faces(detections, n_frames, every=every))
    covered = set(main.frame)
    face_frames_ = {n for n in range(1, 61) if truth[n - 1] is not None}
    assert covered <= face_frames_  # never a face on an empty frame
    missed = face_frames_ - covered
    if every == 1: assert not missed
    else:  # only the frames after the last detection before an empty stretch, or before the end
        assert all(any(b - every < n <= b for b in (19, 60)) for n in missed), sorted(missed)
    for r in main.itertuples(): assert iou((r.x, r.y, r.w, r.h), truth[r.frame - 1]) >= 0.5


def test_detections_are_in_pixels_of_the_original_frame(tmp_path):
    frames_, truth = face_frames(6, size=(640, 480), empty=())
    path = write_video(tmp_path / "vga.mp4", frames_)
    for size in (320, 640):
        detections, _, _ = detect_faces(path, make_detector(), size=size, every=1, progress=False)
        for n, faces in detections.items(): assert len(faces) == 1 and iou(faces[0][:4], truth[n - 1]) > 0.7


def test_plain_frames_have_no_face():
    haar = HaarDetector()
    for img in (background((320, 240)), background((640, 480), seed=3), np.full((240, 320, 3), 128, np.uint8),
                np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)):
        assert haar(img) == []
    (face,) = haar(face_frames(1, empty=())[0][0])
    assert face.score > 0 and face.landmarks is None


def test_make_detector_names_what_is_missing(tmp_path):
    assert set(DETECTORS) == {"haar", "yunet"} and make_detector().name == "haar"
    assert make_detector().version == f"OpenCV {cv2.__version__} haarcascade_frontalface_default.xml"
    with pytest.raises(ValueError, match="unknown face detector 'mtcnn': choose one of haar, yunet"): make_detector("mtcnn")
    with pytest.raises(ValueError, match="--detector-weights FILE"): make_detector("yunet")
    with pytest.raises(FileNotFoundError, match="yunet.onnx"): make_detector("yunet", weights=tmp_path / "yunet.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"): make_detector("yunet", weights=tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="mine.xml"): make_detector("haar", weights=tmp_path / "mine.xml")
    for name, text in [("empty.xml", "<opencv_storage></opencv_storage>"), ("junk.xml", "not xml at all")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name): make_detector("haar", weights=tmp_path / name)


def moving(frames_, x0=100.0, dx=2.0, side=60.0):
    "One face detection per frame in `frames_`, moving right by `dx` pixels a frame."
    return {n: [Face(x0 + dx * n, 50.0, side, side, 5.0)] for n in frames_}


def test_track_faces_bridges_a_short_gap_and_splits_at_a_long_one():
    one_gap = {**moving(range(1, 52, 5)), 26: []}
    t = track_faces(one_gap, 51, every=5)
    assert list(t.columns) == TRACK_COLUMNS and t.face_id.unique().tolist() == [0]
    assert t.frame.tolist() == list(range(1, 52)) and t.detected.sum() == 10 and not t.set_index("frame").detected[26]
    row = t.set_index("frame").loc[23]  # interpolated between the detections at 21 and 31
    assert np.isclose(row.x, 100 + 2 * 21 + (23 - 21) / (31 - 21) * (2 * 31 - 2 * 21)) and np.isnan(row.lm0_x)
    long_gap = {**moving(range(1, 52, 5)), 21: [], 26: []}
    spans = track_faces(long_gap, 51, every=5).groupby("face_id").frame.agg(["min", "max"]).values.tolist()
    assert spans == [[1, 16], [31, 51]]
    assert len(track_faces({1: [Face(0, 0, 9, 9, 1.0)], 6: []}, 10)) == 0  # a single detection is no track
    assert list(track_faces({}, 10).columns) == TRACK_COLUMNS


def test_track_faces_keeps_two_faces_apart_and_interpolates_landmarks():
    lm = lambda n: (ARCFACE_TEMPLATE + n).astype(np.float32)
    dets = {n: [Face(300.0, 100, 80, 80, 0.9, lm(n)), Face(20.0 + n, 20, 40, 40, 0.8, None)] for n in (1, 6, 11)}
    t = track_faces(dets, 11, every=5)
    assert t.groupby("face_id").frame.agg(["min", "max"]).values.tolist() == [[1, 11], [1, 11]]
    assert t.groupby("face_id").w.nunique().tolist() == [1, 1]  # each track keeps its own face
    big = t[t.w == 80].set_index("frame")
    assert np.isclose(big.loc[3, "lm0_x"], ARCFACE_TEMPLATE[0, 0] + 3) and np.isclose(big.loc[3, "det_score"], 0.9)


def test_main_subject_prefers_the_longer_larger_face():
    big = {n: [Face(300, 100, 120, 120, 5.0)] for n in range(1, 41)}     # frames 1-40: 40 × 120²
    small = {n: [Face(20, 20, 40, 40, 5.0)] for n in range(1, 61)}      # frames 1-60: 60 × 40²
    main = main_subject(track_faces({n: big.get(n, []) + small[n] for n in range(1, 61)}, 60, every=1))
    assert main.frame.tolist() == list(range(1, 61)) and main.w.tolist() == [120.0] * 40 + [40.0] * 20
    long = {n: [Face(300, 100, 60, 60, 5.0)] for n in range(1, 61)}     # 60 × 60² beats 10 × 100²
    brief = {n: [Face(20, 20, 100, 100, 5.0)] for n in range(21, 31)}
    main = main_subject(track_faces({n: long[n] + brief.get(n, []) for n in range(1, 61)}, 60, every=1))
    assert (main.w == 60).all()


# --- cropping ----------------------------------------------------------------------------------------------------------------

def test_crop_matrix_maps_landmarks_onto_the_template():
    "Landmarks made by a known similarity p -> s·R(a)·p + t of the template come back onto it: the map is the inverse similarity."
    for a_deg, s, t, size in [(12, 2.5, (300.0, 120.0), 112), (-30, 0.7, (5.0, 40.0), 224)]:
        a = np.deg2rad(a_deg)
        R = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        landmarks = ARCFACE_TEMPLATE @ R.T + np.array(t)
        m = crop_matrix((0, 0, 10, 10), landmarks, size=size)
        k = size / 112
        assert np.allclose(landmarks @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE * k, atol=1e-3)
        inverse = k * np.linalg.inv(R)
        assert np.allclose(m[:, :2], inverse, atol=1e-5) and np.allclose(m[:, 2], -inverse @ np.array(t), atol=1e-3)


def test_crop_matrix_of_a_box_is_a_square_with_margin():
    x, y, w, h, margin, size = 40.0, 60.0, 80.0, 100.0, 0.5, 112
    m = crop_matrix((x, y, w, h), size=size, margin=margin)
    side = max(w, h) * (1 + margin)
    # pixel-edge coordinates: the square [cx - side/2, cx + side/2] maps onto [0, size]; pixel centres sit at edge - 0.5
    edge = lambda X, Y: m[:, :2] @ (np.array([X, Y]) - 0.5) + m[:, 2] + 0.5
    cx, cy = x + w / 2, y + h / 2
    assert np.allclose(edge(cx - side / 2, cy - side / 2), [0, 0]) and np.allclose(edge(cx + side / 2, cy + side / 2), [size, size])
    assert np.allclose(m[:, :2], np.eye(2) * size / side)


def test_crop_face_equals_opencv_resize_of_the_box():
    rng = np.random.default_rng(0)
    blur = cv2.GaussianBlur(rng.normal(0, 120, (900, 900, 3)).astype(np.float32), (0, 0), 3)
    img = np.clip(blur * 4 + 128, 0, 255).astype(np.uint8)
    for (x, y, side), interp, tol in [((101, 153, 560), cv2.INTER_AREA, 1.5), ((40, 60, 80), cv2.INTER_LINEAR, 0.5)]:
        ref = cv2.resize(img[y:y + side, x:x + side], (112, 112), interpolation=interp)
        got = crop_face(img, crop_matrix((x, y, side, side), margin=0.0))
        assert got.shape == (112, 112, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - ref).mean() < tol
    m = crop_matrix((101, 153, 560, 560), margin=0.0)
    ref = cv2.resize(img[153:713, 101:661], (112, 112), interpolation=cv2.INTER_AREA)
    error = lambda crop: np.abs(crop.astype(int) - ref).mean()
    assert error(cv2.warpAffine(img, m, (112, 112))) > 2 * error(crop_face(img, m))  # a plain warp aliases
    edge = crop_face(img, crop_matrix((-50, -50, 100, 100), margin=0.0))  # past the frame: the edge replicated, no black
    assert np.array_equal(edge[0, 0], img[0, 0])

"""e2e: looking at attention through the clients. outputs.entropy from the
Python client (attend, decode, batch_decode) and `attnctl attend --entropy`
against NumPy's -sum p ln p; `attnctl attend --heatmap` read back with
Pillow (Debian's python3-pil): its size, and on a crafted request where key
j = h dominates head h, cell colours ordered like the weights; `--bertviz`
JSON equal to the weights with the tokens; `--heads` sending only those
heads; a tokens file of the wrong length refused naming the file; weights
past the server's cap refused with a hint.

Usage: heatmap_e2e_test.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import json
import pathlib
import re
import subprocess
import sys
import unittest

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

HEATMAP_LINE = re.compile(
    r"^heatmap (?P<path>\S+) (?P<w>\d+)x(?P<h>\d+) px: heads (?P<heads>\S+), "
    r"(?P<rows>\d+)x(?P<cols>\d+) cells of (?P<cw>\d+)x(?P<ch>\d+) px.*; "
    r"tiles at (?P<tiles>[\d, ]+); rendered in (?P<ms>[\d.]+) ms$", re.M)


def probabilities(q, k, *, scale=None, causal=False, key_lengths=None):
    """Softmax attention probabilities [B, Hq, Lq, Lk] in float64 (causal
    bottom-right; a row with no visible key is all zeros)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    _, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale else 1 / np.sqrt(d))
    visible = np.ones(s.shape, dtype=bool)
    for b in range(q.shape[0]):
        length = lk if key_lengths is None else key_lengths[b]
        j = np.arange(lk)[None, :]
        vis = j < length
        if causal:
            vis = vis & (j <= np.arange(lq)[:, None] + length - lq)
        visible[b] = vis[None]
    s = np.where(visible, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    total = p.sum(axis=-1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1), 0)


def entropy(p):
    """-sum p ln p over the keys, 0 where p is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def luminance(rgb):
    rgb = np.asarray(rgb, np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


class HeatmapE2ETest(unittest.TestCase):
    server = None
    client = None

    @classmethod
    def setUpClass(cls):
        cls.work = pathlib.Path(ARGS.work_dir)
        cls.server, cls.client = harness.start_serving(ARGS.server, cls.work)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_check()

    def setUp(self):
        self.rng = np.random.default_rng(abs(hash(self.id())) % (2**32))

    def attnctl(self, *args, timeout=60):
        cmd = [ARGS.attnctl, f"--target={self.server.target}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def save(self, name, array):
        path = self.work / f"{name}.npy"
        np.save(path, array)
        return str(path)

    def crafted(self, lq=20, heads=4, d=32, dominance=6.0):
        """q, k [1, L, H, D] where key j = h dominates every query of head h:
        keys are one-hot in their position, queries dominance·e_h plus noise,
        so the other keys' weights differ too (scale 1)."""
        k = np.zeros((1, lq, heads, d), np.float32)
        for j in range(lq):
            k[0, j, :, j] = 1
        q = (0.5 * self.rng.standard_normal((1, lq, heads, d))).astype(np.float32)
        for h in range(heads):
            q[0, :, h, h] += dominance
        v = self.rng.standard_normal((1, lq, heads, d)).astype(np.float32)
        return q, k, v

    def tokens_file(self, name, count):
        path = self.work / name
        path.write_text("".join(f"tok{i}\n" for i in range(count)))
        return str(path)

    # --- entropy ---------------------------------------------------------------

    def test_python_attend_entropy_matches_numpy(self):
        q = self.rng.standard_normal((2, 12, 4, 16)).astype(np.float32)
        k = self.rng.standard_normal((2, 30, 2, 16)).astype(np.float32)
        v = self.rng.standard_normal((2, 30, 2, 16)).astype(np.float32)
        # Row 1 sees no key at all: its entropy is 0.
        r = self.client.attend(q, k, v, causal=True, key_lengths=[30, 0], entropy=True,
                               weights=True)
        self.assertIsNone(r.lse)
        self.assertEqual(r.entropy.shape, (2, 4, 12))
        self.assertEqual(r.entropy.dtype, np.float32)
        want = entropy(probabilities(q, k, causal=True, key_lengths=[30, 0]))
        np.testing.assert_allclose(r.entropy, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r.entropy[1], 0)
        np.testing.assert_allclose(r.entropy, entropy(r.weights.astype(np.float64)), atol=1e-4)
        self.assertIsNone(self.client.attend(q, k, v).entropy)

    def test_python_decode_and_batch_decode_entropy(self):
        sessions = [self.client.create_session(2, 16) for _ in range(2)]
        try:
            ks, qs = [], []
            for s in sessions:
                k = self.rng.standard_normal((9, 2, 16)).astype(np.float32)
                q = self.rng.standard_normal((1, 4, 16)).astype(np.float32)
                r = self.client.decode(s, q, k, k, entropy=True)
                self.assertEqual(r.entropy.shape, (1, 4, 1))
                np.testing.assert_allclose(
                    r.entropy, entropy(probabilities(q[None], k[None], causal=True)),
                    rtol=1e-5, atol=1e-5)
                ks.append(k)
                qs.append(q)
            entries = []
            for i, s in enumerate(sessions):
                new = self.rng.standard_normal((1, 2, 16)).astype(np.float32)
                ks[i] = np.concatenate([ks[i], new])
                entries.append((s, qs[i], new, new))
            results = attnserve_client.raise_first_error(
                self.client.batch_decode(0, entries, entropy=True))
            for i, r in enumerate(results):
                np.testing.assert_allclose(
                    r.entropy, entropy(probabilities(qs[i][None], ks[i][None], causal=True)),
                    rtol=1e-5, atol=1e-5)
                self.assertIsNone(r.lse)
        finally:
            for s in sessions:
                self.client.close_session(s)

    def test_attnctl_entropy_matches_numpy(self):
        q = self.rng.standard_normal((1, 10, 3, 16)).astype(np.float32)
        k = self.rng.standard_normal((1, 14, 3, 16)).astype(np.float32)
        e_path = str(self.work / "entropy.npy")
        r = self.attnctl("attend", f"--q={self.save('eq', q)}", f"--k={self.save('ek', k)}",
                         f"--v={self.save('ev', k)}", "--causal", "--entropy",
                         f"--entropy_out={e_path}")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("entropy F32 [1, 3, 10] nats", r.stdout)
        got = np.zeros((1, 3, 10))
        rows = re.findall(r"^  row (\d+) head (\d+): (.*)$", r.stdout, re.M)
        self.assertEqual(len(rows), 3)
        for b, h, values in rows:
            got[int(b), int(h)] = [float(x) for x in values.split()]
        want = entropy(probabilities(q, k, causal=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.load(e_path), want, rtol=1e-5, atol=1e-5)

    # --- heatmap and bertviz ---------------------------------------------------

    def heatmap_cells(self, stdout, png):
        """The tiles' cell colours [heads, rows, cols, 3] (each cell's centre
        pixel) and the geometry attnctl printed; checks the PNG's size."""
        m = HEATMAP_LINE.search(stdout)
        self.assertIsNotNone(m, stdout)
        image = Image.open(png)
        self.assertEqual(image.format, "PNG")
        self.assertEqual(image.size, (int(m["w"]), int(m["h"])))
        pixels = np.asarray(image.convert("RGB"))
        rows, cols, cw, ch = (int(m[x]) for x in ("rows", "cols", "cw", "ch"))
        tiles = [tuple(int(v) for v in t.split(",")) for t in m["tiles"].split()]
        cells = np.zeros((len(tiles), rows, cols, 3))
        for i, (x, y) in enumerate(tiles):
            self.assertLessEqual(x + cols * cw, image.size[0])
            self.assertLessEqual(y + rows * ch, image.size[1])
            ys = y + np.arange(rows) * ch + ch // 2
            xs = x + np.arange(cols) * cw + cw // 2
            cells[i] = pixels[ys[:, None], xs[None, :]]
        return cells, m

    def test_heatmap_colours_follow_the_weights(self):
        lq, heads = 20, 4
        q, k, v = self.crafted(lq, heads)
        png = str(self.work / "crafted.png")
        w_path = str(self.work / "crafted_w.npy")
        bertviz = str(self.work / "crafted.json")
        tokens = self.tokens_file("tokens20.txt", lq)
        r = self.attnctl("attend", f"--q={self.save('cq', q)}", f"--k={self.save('ck', k)}",
                         f"--v={self.save('cv', v)}", "--scale=1", f"--heatmap={png}",
                         f"--weights_out={w_path}", f"--bertviz={bertviz}", f"--tokens={tokens}")
        self.assertEqual(r.returncode, 0, r.stderr)
        weights = np.load(w_path)
        np.testing.assert_allclose(weights, probabilities(q, k, scale=1.0), atol=1e-6)
        cells, m = self.heatmap_cells(r.stdout, png)
        self.assertEqual(m["heads"], "0-3")
        self.assertEqual((int(m["rows"]), int(m["cols"])), (lq, lq))
        # 20 tokens: cells of 384 // 20 px, labels drawn; 2x2 tiles.
        self.assertEqual((int(m["cw"]), int(m["ch"])), (19, 19))
        self.assertIn("tokens drawn", r.stdout)
        tiles = [tuple(int(v) for v in t.split(",")) for t in m["tiles"].split()]
        self.assertEqual(tiles[0][1], tiles[1][1])
        self.assertEqual(tiles[2][0], tiles[0][0])
        lum = luminance(cells)
        for h in range(heads):
            # The dominant key is the brightest cell of every row...
            np.testing.assert_array_equal(np.argmax(lum[h], axis=1), np.full(lq, h))
            # ...and the colours are ordered like the weights (viridis gets
            # brighter with the weight; 1 of 255 for rounding).
            order = np.argsort(weights[0, h].ravel(), kind="stable")
            self.assertTrue(np.all(np.diff(lum[h].ravel()[order]) >= -1.0),
                            f"head {h}: luminance not ordered like the weights")
        # The scale's ends are the extreme weights: their cells are viridis' ends.
        top = np.unravel_index(np.argmax(weights[0, :heads]), weights[0, :heads].shape)
        np.testing.assert_allclose(cells[top], (0xfd, 0xe7, 0x25), atol=2)
        low = np.unravel_index(np.argmin(weights[0, :heads]), weights[0, :heads].shape)
        np.testing.assert_allclose(cells[low], (0x44, 0x01, 0x54), atol=2)

        with open(bertviz) as f:
            doc = json.load(f)
        self.assertEqual(sorted(doc), ["attention", "tokens"])
        self.assertEqual(len(doc["attention"]), 1)  # one layer
        attention = np.asarray(doc["attention"][0])
        self.assertEqual(attention.shape, (1, heads, lq, lq))
        self.assertTrue(np.allclose(attention, weights))
        # Printed so they read back as the same floats.
        np.testing.assert_array_equal(attention.astype(np.float32), weights)
        self.assertEqual(doc["tokens"], [f"tok{i}" for i in range(lq)])

        # Log scale: the dominant key stays the brightest.
        r = self.attnctl("attend", f"--q={self.save('cq', q)}", f"--k={self.save('ck', k)}",
                         f"--v={self.save('cv', v)}", "--scale=1", f"--heatmap={png}",
                         "--heatmap_log")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("log10 scale", r.stdout)
        cells, _ = self.heatmap_cells(r.stdout, png)
        for h in range(heads):
            np.testing.assert_array_equal(np.argmax(luminance(cells[h]), axis=1),
                                          np.full(lq, h))

    def test_heads_sends_only_those_heads(self):
        # GQA, 8 query heads over 2 KV heads; heads 6 and 1 use KV heads 1 and 0.
        q = self.rng.standard_normal((2, 24, 8, 16)).astype(np.float32)
        k = self.rng.standard_normal((2, 24, 2, 16)).astype(np.float32)
        png = str(self.work / "heads.png")
        bertviz = str(self.work / "heads.json")
        w_path = str(self.work / "heads_w.npy")
        e_path = str(self.work / "heads_e.npy")
        r = self.attnctl("attend", f"--q={self.save('hq', q)}", f"--k={self.save('hk', k)}",
                         f"--v={self.save('hv', k)}", "--causal", "--heads=6,1",
                         "--batch_row=1", f"--heatmap={png}", f"--bertviz={bertviz}",
                         f"--weights_out={w_path}", f"--entropy_out={e_path}")
        self.assertEqual(r.returncode, 0, r.stderr)
        want = probabilities(q, k, causal=True)[:, [6, 1]]
        weights = np.load(w_path)
        self.assertEqual(weights.shape, (2, 2, 24, 24))
        np.testing.assert_allclose(weights, want, atol=1e-6)
        np.testing.assert_allclose(np.load(e_path), entropy(want), rtol=1e-5, atol=1e-5)
        cells, m = self.heatmap_cells(r.stdout, png)
        self.assertEqual(m["heads"], "6,1")
        self.assertEqual(cells.shape[0], 2)
        with open(bertviz) as f:
            doc = json.load(f)
        np.testing.assert_array_equal(np.asarray(doc["attention"][0], np.float32), weights[1:2])
        self.assertEqual(doc["tokens"], [str(i) for i in range(24)])

    def test_long_sequences_are_max_pooled(self):
        png = str(self.work / "pooled.png")
        r = self.attnctl("attend", "--shape=1,600,2,600,2,16", "--causal", f"--heatmap={png}")
        self.assertEqual(r.returncode, 0, r.stderr)
        cells, m = self.heatmap_cells(r.stdout, png)
        # 600 rows and keys at 3 per cell: 200 cells per axis.
        self.assertEqual((int(m["rows"]), int(m["cols"])), (200, 200))
        self.assertIn("max-pooled 3x3", r.stdout)
        # Causal: cells above the diagonal hold only masked keys, the lowest colour.
        lum = luminance(cells[0])
        self.assertLess(lum[0, -1], lum[-1, 0])

    # --- refusals -------------------------------------------------------------

    def test_tokens_file_of_the_wrong_length_names_the_file(self):
        q, k, v = self.crafted(20, 2)
        args = [f"--q={self.save('tq', q)}", f"--k={self.save('tk', k)}",
                f"--v={self.save('tv', v)}", f"--heatmap={self.work / 'never.png'}"]
        wrong = self.tokens_file("tokens19.txt", 19)
        r = self.attnctl("attend", *args, f"--tokens={wrong}")
        self.assertEqual(r.returncode, 2, r.stdout)
        self.assertIn(wrong, r.stderr)
        self.assertIn("expected 20 tokens", r.stderr)
        self.assertIn("got 19", r.stderr)
        missing = str(self.work / "no-such-tokens.txt")
        r = self.attnctl("attend", *args, f"--tokens={missing}")
        self.assertEqual(r.returncode, 2, r.stdout)
        self.assertIn(missing, r.stderr)
        self.assertFalse((self.work / "never.png").exists())

    def test_weights_over_the_cap_get_a_hint(self):
        # 16 heads x 1100 x 1100 F32 is 77 MB, over the default 64 MiB cap.
        r = self.attnctl("attend", "--shape=1,1100,16,1100,16,8",
                         f"--heatmap={self.work / 'too_big.png'}")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("RESOURCE_EXHAUSTED", r.stderr)
        self.assertIn("outputs.weights", r.stderr)  # the server's message
        self.assertIn("hint", r.stderr)
        self.assertIn("--heads", r.stderr)


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()

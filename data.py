"""
Datasets and the DDP-aware infinite loader.

- SyntheticShapes: a built-in CLEVR-like dataset (Johnson et al., CVPR 2017, as a look-alike, not
  a copy): 1-4 shaded spheres, cubes and cylinders, rubber or metal, in CLEVR's eight colours and
  two sizes, on a grey floor seen in perspective, with soft shadows and occlusion. Rendered on the
  fly with numpy, deterministic per (seed, index), any power-of-two resolution; nothing to download.
- ImageFolderDataset: a folder (recursive) or a .zip of images (the stylegan2-ada dataset_tool
  layout included), centre-cropped and LANCZOS-resized to the training resolution.
- InfiniteLoader: batches forever; the order is a pure function of (seed, global image position),
  so it does not depend on the number of GPUs and a resumed run sees exactly the same batches.

Every item is a uint8 tensor [3, H, W]; train.py maps it to [-1, 1]. Bad input raises DataError
with one line that names the file and the fix.

Run alone (writes a grid of one batch, prints the dataset size and loading speed):
    python data.py                                   # synthetic dataset
    python data.py --data ~/ffhq.zip --resolution 256
    python data.py --data ~/photos --check           # decode every image, list all bad files
    python data.py --resolution 32 --workers 0 --batch 256   # synthetic img/s on one core
"""
import argparse, functools, hashlib, io, json, math, os, signal, sys, threading, time, zipfile
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

class DataError(ValueError):
    """Bad input data; the message is one line naming the file(s) and the fix."""

def _check_resolution(resolution):
    if not (isinstance(resolution, int) and 4 <= resolution <= 2048 and resolution & (resolution - 1) == 0):
        raise DataError(f'--resolution {resolution} is not a power of two in [4, 2048]; use e.g. 32 or 64')

def _few(names, k=3):  # 'a, b, c and 5 more'
    return ', '.join(names[:k]) + (f' and {len(names) - k} more' if len(names) > k else '')

# ----------------------------------------------------------------------------------------------
# Synthetic CLEVR-like scenes. World: X right, Y up, Z away from the camera; objects stand on Y=0.
# The camera looks down at the origin at elevation _PHI; positions are projected in perspective,
# each object's own shape orthographically at its perspective scale (a 2.5D render: exact enough
# at these object sizes, and it keeps every object a handful of analytic 2D shapes).

_COLOURS = np.array([[87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20],    # CLEVR's gray, red,
                     [129, 74, 25], [129, 38, 192], [41, 208, 208], [255, 238, 51]],  # blue, green, brown,
                    np.float32) / 255                                                  # purple, cyan, yellow
_SHAPES = ('sphere', 'cube', 'cylinder')
_SIZES = (0.7, 0.4)                        # half-extent of large / small objects (world units)
_PHI = math.radians(35)                    # camera elevation
_DIST, _FOCAL = 10.0, 1.9                  # camera's horizontal distance to the origin; focal length in image widths
_UP = np.array([0, math.cos(_PHI), math.sin(_PHI)], np.float32)      # screen-up direction in the world
_VIEW = np.array([0, math.sin(_PHI), -math.cos(_PHI)], np.float32)   # towards the camera (float32 constants keep the arrays float32)
_TOP = np.array([0, 1, 0], np.float32)                                # normal of cube and cylinder tops

def _project(x, z):
    """Ground point (x, 0, z) -> screen position (in image widths, y down) and scale (widths per world unit)."""
    p = np.array([x, -_DIST * math.tan(_PHI), z + _DIST])
    depth = -p @ _VIEW
    return 0.5 + _FOCAL * x / depth, 0.56 - _FOCAL * (p @ _UP) / depth, _FOCAL / depth

def _ellipse_sdf(x, y, a, b):  # first-order distance to the ellipse (x/a)^2 + (y/b)^2 = 1, in pixels
    k2 = (x / a) ** 2 + (y / b) ** 2
    g = np.sqrt((x / a ** 2) ** 2 + (y / b ** 2) ** 2) + 1e-6
    return (k2 - np.sqrt(k2)) / g

def _polygon_sdf(x, y, pts):  # convex polygon pts [n, 2]: max of the edges' signed distances (exact away from corners)
    pts = pts.astype(np.float32)
    edges = np.roll(pts, -1, 0) - pts                                       # [n, 2]
    normal = np.stack([edges[:, 1], -edges[:, 0]], 1) / (np.hypot(edges[:, 0], edges[:, 1])[:, None] + 1e-9)
    normal *= np.where(((pts.mean(0) - pts) * normal).sum(1) > 0, -1, 1)[:, None]  # make them point outwards
    offset = (pts * normal).sum(1)
    return (x * normal[:, :1, None] + y * normal[:, 1:, None] - offset[:, None, None]).max(0)  # [n, h, w] -> [h, w]

class SyntheticShapes(torch.utils.data.Dataset):
    """CLEVR-like scenes; item i is a function of (seed, i) only. scene(i) gives the parameters."""

    def __init__(self, resolution, num_images, seed=0):
        _check_resolution(resolution)
        self.resolution, self.num_images, self.seed = resolution, num_images, seed
        self.name = f'synthetic-seed{seed}-n{num_images}'
        r = resolution
        y, x = (np.arange(r, dtype=np.float32)[:, None] + 0.5) / r, (np.arange(r, dtype=np.float32)[None] + 0.5) / r
        # the floor: lit brighter towards the camera and the centre, like CLEVR's area lights
        self._floor = (1 + 0.25 * (y - 0.5) - 0.35 * ((x - 0.5) ** 2 + (y - 0.55) ** 2)).astype(np.float32)  # [H, W]

    num_classes = 4  # class labels (--cond): the number of objects in the scene minus 1

    def __len__(self):
        return self.num_images

    @functools.cached_property
    def labels(self):  # [N] int64, computed on first use (about 1 s per 50k images)
        return np.array([len(self.scene(i)['objects']) - 1 for i in range(self.num_images)], np.int64)

    def scene(self, index):
        """Scene parameters of item `index`: floor brightness, light direction, objects far to near."""
        rng = np.random.default_rng([self.seed, index])
        azimuth = math.radians(rng.uniform(-165, -125))        # key light from the upper left, in front of the objects
        light = np.array([math.cos(azimuth) * 0.6, 0.75, math.sin(azimuth) * 0.6])
        objects = []
        for _ in range(rng.integers(1, 5)):
            size = _SIZES[rng.integers(2)]
            for _try in range(10):                              # reject overlaps on the ground; crowded scenes get fewer objects
                x, z = rng.uniform(-2.5, 2.5), rng.uniform(-2.5, 2.8)
                if all(math.hypot(x - o['x'], z - o['z']) > 1.6 * (size + o['size']) for o in objects):
                    objects.append(dict(shape=_SHAPES[rng.integers(3)], colour=int(rng.integers(8)), metal=bool(rng.random() < 0.5),
                                        size=size, x=x, z=z, angle=rng.uniform(0, math.pi / 2)))
                    break
        objects.sort(key=lambda o: -o['z'])                     # painter's algorithm: far objects first
        return dict(floor=rng.uniform(0.40, 0.52), light=(light / np.linalg.norm(light)).astype(np.float32), objects=objects)

    def __getitem__(self, index):
        return torch.from_numpy(self.render(self.scene(index)))

    def render(self, scene):
        """Scene parameters -> uint8 array [3, H, W]."""
        r = self.resolution
        img = np.repeat(self._floor[None] * scene['floor'], 3, 0)  # [3, H, W]
        light = scene['light']
        half = (light + _VIEW) / np.linalg.norm(light + _VIEW)  # Blinn-Phong half vector
        placed = []
        for o in scene['objects']:
            u, v, s = _project(o['x'], o['z'])
            placed.append((o, float(u * r), float(v * r), float(s * r * o['size'])))  # base point (px), object half-extent (px)
        shadow = np.zeros((r, r), np.float32)
        for o, bx, by, R in placed:                             # all shadows first: they fall on the floor only
            sx, sy = bx - 1.4 * light[0] / light[1] * R, by + 1.4 * light[2] / light[1] * R * _UP[2]
            a, b = 1.6 * R, 1.3 * R * _UP[2]
            box = self._box(sx - 1.3 * a, sx + 1.3 * a, sy - 1.3 * b, sy + 1.3 * b)
            if box:
                xs, ys = box[2] - sx, box[3] - sy
                t = np.clip(1.6 - 1.6 * np.sqrt((xs / a) ** 2 + (ys / b) ** 2), 0, 1)
                sl = shadow[box[0], box[1]]
                np.maximum(sl, 0.6 * t * t * (3 - 2 * t), out=sl)  # smoothstep: soft penumbra
        img *= 1 - shadow
        for o, bx, by, R in placed:
            getattr(self, '_' + o['shape'])(img, o, bx, by, R, light, half)
        return (img * 255 + 0.5).clip(0, 255).astype(np.uint8)

    def _box(self, x0, x1, y0, y1):  # pixel bounding box -> (row slice, col slice, x centres [1, w], y centres [h, 1]) or None
        r = self.resolution
        x0, x1, y0, y1 = max(int(x0) - 1, 0), min(int(x1) + 2, r), max(int(y0) - 1, 0), min(int(y1) + 2, r)
        if x0 >= x1 or y0 >= y1:
            return None
        xs, ys = np.arange(x0, x1, dtype=np.float32) + 0.5, np.arange(y0, y1, dtype=np.float32) + 0.5
        return slice(y0, y1), slice(x0, x1), xs[None], ys[:, None]

    @staticmethod
    def _shade(o, n_l, n_h, refl_up):  # n.light, n.half, reflected ray's up component: scalars or [h, w] -> [3, h, w]
        """Lambert + Blinn-Phong for rubber; metal is mostly a reflection of a bright sky over a grey floor."""
        diffuse = np.maximum(n_l, 0)
        if o['metal']:
            env = 0.25 + 0.75 * np.clip(refl_up * 3 + 0.3, 0, 1)
            mult, add = 0.1 + 0.35 * diffuse + 0.6 * env, 0.9 * np.maximum(n_h, 0) ** 40
        else:
            mult, add = 0.3 + 0.8 * diffuse, 0.12 * np.maximum(n_h, 0) ** 12
        return _COLOURS[o['colour']][:, None, None] * mult + add

    def _shade_flat(self, o, n, light, half):  # a flat face with world normal n -> [3, 1, 1]
        return self._shade(o, n @ light, n @ half, 2 * (n @ _VIEW) * n[1] - _VIEW[1])

    @staticmethod
    def _composite(img, box, parts):
        """parts: (sdf [h, w] in px, colour [3, h, w] or broadcastable) of pieces that tile one object."""
        covs = [np.clip(0.5 - d, 0, 1) for d, _ in parts]      # analytic anti-aliasing: a 1-px box filter's coverage
        total = sum(covs)
        colour = sum(c * col for c, (_, col) in zip(covs, parts)) / np.maximum(total, 1e-6)  # seams between pieces stay opaque
        region = img[:, box[0], box[1]]
        region += np.minimum(total, 1) * (colour - region)

    def _sphere(self, img, o, bx, by, R, light, half):
        cx, cy = bx, by - R * _UP[1]                             # centre one radius above the floor
        box = self._box(cx - R, cx + R, cy - R, cy + R)
        if not box:
            return
        a, b = (box[2] - cx) / R, (cy - box[3]) / R               # screen right / up, in radii
        c = np.sqrt(np.clip(1 - a * a - b * b, 0, 1))            # towards the camera; normal = a right + b up + c view
        n_dot = lambda w: a * w[0] + b * (_UP @ w) + c * (_VIEW @ w)
        refl_up = 2 * c * (b * _UP[1] + c * _VIEW[1]) - _VIEW[1]
        col = self._shade(o, n_dot(light), n_dot(half), refl_up)  # [3, h, w]
        self._composite(img, box, [(np.hypot(box[2] - cx, box[3] - cy) - R, col)])

    def _cube(self, img, o, bx, by, R, light, half):
        ca, sa = math.cos(o['angle']), math.sin(o['angle'])
        corners = np.array([[ca * x - sa * z, sa * x + ca * z] for x, z in ((1, 1), (1, -1), (-1, -1), (-1, 1))])  # [4, (X, Z)]
        to_screen = lambda X, Y, Z: np.stack([bx + R * X, by - R * (Y * _UP[1] + Z * _UP[2])], -1)
        bottom, top = to_screen(corners[:, 0], 0, corners[:, 1]), to_screen(corners[:, 0], 2, corners[:, 1])  # [4, 2] px
        allp = np.concatenate([bottom, top])
        box = self._box(allp[:, 0].min(), allp[:, 0].max(), allp[:, 1].min(), allp[:, 1].max())
        if not box:
            return
        x, y = box[2], box[3]
        parts = [(_polygon_sdf(x, y, top), self._shade_flat(o, _TOP, light, half))]
        for i in range(4):                                        # side faces facing the camera
            j = (i + 1) % 4
            n = np.array([corners[i, 0] + corners[j, 0], 0, corners[i, 1] + corners[j, 1]], np.float32)
            if n @ _VIEW > 1e-3:
                n /= np.linalg.norm(n)
                face = np.stack([bottom[i], bottom[j], top[j], top[i]])
                parts.append((_polygon_sdf(x, y, face), self._shade_flat(o, n, light, half)))
        self._composite(img, box, parts)

    def _cylinder(self, img, o, bx, by, R, light, half):
        ry, h = R * _UP[2], 2 * R * _UP[1]                        # ellipse half-height; screen height of the side
        box = self._box(bx - R, bx + R, by - h - ry, by + ry)
        if not box:
            return
        x, y = box[2] - bx, box[3] - by                          # [1, w], [h, 1]
        top = _ellipse_sdf(x, y + h, R, ry)
        side = np.minimum(np.maximum(np.abs(x) - R, np.maximum(-h - y, y)), _ellipse_sdf(x, y, R, ry))
        a = np.clip(x / R, -1, 1)                                 # side normal (a, 0, -sqrt(1 - a^2)), per column
        n_dot = lambda w: a * w[0] - np.sqrt(1 - a * a) * w[2]
        side_col = self._shade(o, n_dot(light), n_dot(half), -_VIEW[1])  # [3, 1, w]; horizontal normals reflect the floor
        self._composite(img, box, [(top, self._shade_flat(o, _TOP, light, half)),
                                   (np.maximum(side, -top), side_col)])

# ----------------------------------------------------------------------------------------------
# Image folders and zips

_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')

def _to_rgb(im):
    """Any PIL mode -> 'RGB', with the conversions PIL's plain convert('RGB') gets wrong."""
    if im.mode.startswith('I'):  # I;16* and I (how some PNG/TIFF decoders hold 16 bits): scale, convert() would clip at 255
        im = Image.fromarray(np.clip(np.rint(np.asarray(im, np.float64) / 257), 0, 255).astype(np.uint8))
    if im.mode == 'P':           # palette transparency lives in im.info; convert('RGBA') applies it
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
    if im.mode in ('LA', 'La', 'PA', 'RGBA', 'RGBa'):  # composite over white: transparent pixels' colours are arbitrary
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert('RGBA'))
    return im.convert('RGB')     # L, 1, YCbCr, CMYK (Pillow now uses R = 255 (1 - C)(1 - K), the standard formula), ...

def _walk(path):
    """Files under a folder, relative, '/'-separated. Links are followed, but each real folder is read
    once: a link loop (x/up -> ..) would otherwise repeat the images until the path length limit."""
    seen, names, skipped = {os.path.realpath(path)}, [], []
    for d, dirs, fs in os.walk(path, followlinks=True):
        for sub in list(dirs):  # top-down: pruning `dirs` in place stops the walk from entering them
            real = os.path.realpath(os.path.join(d, sub))
            if real in seen:
                dirs.remove(sub)
                skipped.append(os.path.relpath(os.path.join(d, sub), path))
            seen.add(real)
        names += [os.path.relpath(os.path.join(d, f), path).replace(os.sep, '/') for f in fs]
    if skipped:
        print(f'data: skipped {len(skipped)} linked folder(s) under {path} already read through another path '
              f'(a link loop or a second link): {_few(skipped)}', file=sys.stderr)
    return names

class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under a folder (recursive) or in a .zip, in sorted path order; centre crop, LANCZOS resize.
    labels=True: class labels from dataset.json or the first-level subfolders (read_labels)."""

    def __init__(self, path, resolution, max_images=None, skip_bad=False, labels=False):
        _check_resolution(resolution)
        if not os.path.exists(path):
            raise DataError(f'--data {path} does not exist; point --data at a folder or .zip of images, '
                            f'or omit it for the built-in dataset')
        self.path, self.resolution, self.skip_bad = path, resolution, skip_bad
        self.is_zip = os.path.isfile(path)
        if self.is_zip and not zipfile.is_zipfile(path):
            raise DataError(f'--data {path} is a file but not a .zip archive; point --data at a folder or .zip of images')
        self._zip, self._zip_pid, self._warned, self.num_skipped = None, None, set(), 0
        names = self._zipfile().namelist() if self.is_zip else _walk(path)
        # skip hidden files and folders (.ipynb_checkpoints holds copies) and macOS zip debris (__MACOSX/, ._x.png)
        names = sorted(n for n in names if n.lower().endswith(_EXTS) and not any(p.startswith(('.', '__MACOSX')) for p in n.split('/')))
        if not names:
            raise DataError(f'no images ({"/".join(_EXTS)}) found under {path}; '
                            f'point --data at a folder of images or omit --data for the built-in dataset')
        # headers only: Image.open reads the size without decoding pixels (about 0.1 ms per file)
        good, unreadable, small = [], [], []           # the last two: (name, reason)
        for n in names:
            if len(good) == max_images:
                break
            try:
                size = self._size(n)
            except Exception as e:
                unreadable.append((n, 'not an image' if isinstance(e, UnidentifiedImageError) else f'unreadable ({e})'))
                continue
            if min(size) < resolution:
                small.append((n, f'{size[0]}x{size[1]} is smaller than --resolution {resolution}'))
            else:
                good.append(n)
        self.bad = unreadable + small                    # every file dropped here, with the reason
        if self.bad and not skip_bad:  # both kinds in one line: one round of fixing
            kinds = ([f'{len(unreadable)} file(s) are not readable images: {_few([n for n, _ in unreadable])}'] if unreadable else []) + \
                    ([f'{len(small)} image(s) are smaller than --resolution {resolution} on their short side: '
                      f'{_few([n for n, _ in small])}'] if small else [])
            raise DataError(f'under {path}, {"; ".join(kinds)}; ' + ('delete or re-save them, ' if unreadable else '')
                            + ('lower --resolution, ' if small else '') + 'or pass --skip-bad to drop them')
        if not good:
            raise DataError(f'all {len(self.bad)} image(s) under {path} are bad or too small, e.g. {self.bad[0][0]} '
                            f'({self.bad[0][1]}); fix the files or lower --resolution')
        if self.bad:
            print(f'data: dropped {len(self.bad)} bad file(s) under {path}: {_few([n for n, _ in self.bad])} '
                  f'(python data.py --data {path} --check lists why)', file=sys.stderr)
        self.names = good
        self.labels = self.read_labels() if labels else None
        self.num_classes = int(self.labels.max()) + 1 if labels else 0  # as stylegan2-ada: the largest class + 1
        # metrics caches real-image statistics under this key: short, file-name safe, changes with the file list
        digest = hashlib.sha1('\n'.join([os.path.abspath(path)] + good).encode()).hexdigest()[:8]
        self.name = f'{os.path.splitext(os.path.basename(os.path.normpath(path)))[0]}-{digest}-n{len(good)}'

    def __len__(self):
        return len(self.names)

    def read_labels(self):
        """[N] int64 classes of the images: dataset.json's {"labels": [[name, class], ...]} (the stylegan2-ada
        layout; names relative to the root, '/'-separated) or, without it, each image's first-level
        subfolder (classes numbered in sorted folder order)."""
        where = f'{self.path}/dataset.json'
        try:
            raw = self._zipfile().read('dataset.json') if self.is_zip else open(os.path.join(self.path, 'dataset.json'), 'rb').read()
        except (KeyError, FileNotFoundError):
            raw = None
        if raw is None:
            top = [n.split('/')[0] for n in self.names if '/' in n]
            if len(top) < len(self.names):
                loose = [n for n in self.names if '/' not in n]
                raise DataError(f'--cond: {self.path} has no dataset.json and {len(loose)} image(s) outside class subfolders '
                                f'({_few(loose)}); add a dataset.json ({{"labels": [[name, class], ...]}}) or put each '
                                f'class in its own subfolder')
            classes = {c: i for i, c in enumerate(sorted(set(top)))}
            return np.array([classes[c] for c in top], np.int64)
        try:
            table = json.loads(raw)['labels']
            table = None if table is None else {str(name): c for name, c in table}
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{where} is not {{"labels": [[name, class], ...]}}; fix it, or delete it to label by subfolder') from None
        if table is None:
            raise DataError(f'{where} says "labels": null (an unlabelled set); --cond needs a class per image')
        missing = [n for n in self.names if n not in table]
        if missing:
            raise DataError(f'{where} has no label for {len(missing)} image(s): {_few(missing)}; add them or remove those images')
        bad = [n for n in self.names if isinstance(table[n], bool) or not isinstance(table[n], int) or table[n] < 0]
        if bad:
            raise DataError(f'{where}: the labels of {len(bad)} image(s) are not class numbers (integers >= 0): {_few(bad)} '
                            f'(e.g. {table[bad[0]]!r}); --cond trains on integer classes')
        return np.array([table[n] for n in self.names], np.int64)

    def _zipfile(self):  # opened lazily in each process: a zip handle must not be shared by forked workers
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def __getstate__(self):  # for spawned workers (macOS, Windows): they reopen the zip themselves
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def _size(self, name):  # header only; from a zip, streams just the member's first bytes
        with self._zipfile().open(name) if self.is_zip else open(os.path.join(self.path, name), 'rb') as f, Image.open(f) as im:
            return im.size

    def _open(self, name):
        return Image.open(io.BytesIO(self._zipfile().read(name)) if self.is_zip else os.path.join(self.path, name))

    def load(self, index):
        """Decode one image -> uint8 array [3, H, W]; any decoding failure (truncated, corrupt) raises."""
        with self._open(self.names[index]) as im:
            im = _to_rgb(ImageOps.exif_transpose(im))   # phone photos store their rotation in EXIF
        (w, h), s = im.size, min(im.size)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)   # square centre crop; the filter sees past its edges
        return np.asarray(im.resize((self.resolution,) * 2, Image.LANCZOS, box=box)).transpose(2, 0, 1)

    def __getitem__(self, index):
        for k in range(len(self)):  # with skip_bad, a file that fails to decode is replaced by the next good one
            i = (index + k) % len(self)
            try:
                return torch.from_numpy(np.ascontiguousarray(self.load(i)))
            except Exception as e:
                name = os.path.join(self.path, self.names[i])
                if not self.skip_bad:
                    raise DataError(f'{name} could not be decoded ({e}); delete or re-save it, or pass --skip-bad '
                                    f'(python data.py --data {self.path} --check lists every bad file)') from None
                self.num_skipped += 1                    # counted per process (each DataLoader worker has its own)
                if name not in self._warned:
                    self._warned.add(name)
                    print(f'data: skipping {name}, it could not be decoded ({e})', file=sys.stderr)
        raise DataError(f'no image under {self.path} could be decoded; run python data.py --data {self.path} --check')


def check_images(path, resolution):
    """Decode every image; returns [(name, reason)] for all bad files (non-images, too small, corrupt)."""
    ds = ImageFolderDataset(path, resolution, skip_bad=True)
    bad = list(ds.bad)
    for i, n in enumerate(ds.names):
        try:
            ds.load(i)
        except Exception as e:
            bad.append((n, f'could not be decoded: {e}'))
    return sorted(bad)

def make_dataset(path=None, resolution=32, max_images=None, seed=0, skip_bad=False, labels=False):
    """--data PATH (folder or .zip) or, without it, the built-in synthetic dataset (50k images by default).
    labels: a folder or zip reads its class labels (the built-in set always has them)."""
    if max_images is not None and max_images < 1:
        raise DataError(f'--max-images {max_images} keeps no images; pass a positive number or omit it')
    if path is None:
        return SyntheticShapes(resolution, 50_000 if max_images is None else max_images, seed)
    return ImageFolderDataset(path, resolution, max_images, skip_bad, labels)

def make_holdout(path, resolution, start, num, seed=0, skip_bad=False, labels=False):
    """num real images of the same source that a run training on its first `start` never sees (--holdout):
    the built-in set's items start .. start + num - 1, a folder's or zip's next num images in sorted order;
    labels=True: with their classes (.labels, [num] int64)."""
    if path is None:
        full = SyntheticShapes(resolution, start + num, seed)
    else:
        full = ImageFolderDataset(path, resolution, start + num, skip_bad, labels)
        if len(full) < start + num:
            raise DataError(f'--holdout {num}: {path} has {len(full)} usable images and the run trains on {start}; pass '
                            f'--max-images {len(full) - num} (or fewer) to keep {num} aside, or lower --holdout')
    held = torch.utils.data.Subset(full, range(start, start + num))
    held.labels = full.labels[start:start + num] if labels else None
    return held

# ----------------------------------------------------------------------------------------------
# The infinite loader. Position p (images consumed so far, over all ranks) is epoch p // N, item
# perm_e[p % N] with perm_e seeded by (seed, e); its x-flip is a hash of (seed, p). Global batch k
# is positions [k B, (k + 1) B), B = world_size * batch_size, and rank r takes its r-th slice: the
# same images whatever the number of GPUs, and a resume from start_nimg continues the exact sequence.

def _hash(seed, positions):  # splitmix64 finalizer of (seed, position): [n] uint64, uniform bits
    with np.errstate(over='ignore'):  # wrap-around is the point
        z = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

@functools.lru_cache(maxsize=4)  # a 70k permutation takes ~1 ms; consecutive batches share it
def _permutation(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

class _BatchSampler:
    """Yields this rank's batches forever, each as (dataset indices, x-flips)."""

    def __init__(self, num_items, batch_size, rank, world_size, seed, start_nimg, mirror):
        self.n, self.b, self.rank, self.world_size, self.seed, self.start_nimg, self.mirror = \
            num_items, batch_size, rank, world_size, seed, start_nimg, mirror

    def __iter__(self):
        nimg = self.start_nimg
        while True:
            pos = nimg + self.rank * self.b + np.arange(self.b)                       # [b] global positions
            epoch, index = pos // self.n, np.empty(self.b, np.int64)
            for e in np.unique(epoch):                                                # one, or two at an epoch's end
                index[epoch == e] = _permutation(self.n, self.seed, int(e))[pos[epoch == e] % self.n]
            flip = (_hash(self.seed, pos) >> np.uint64(63)).astype(bool) if self.mirror else np.zeros(self.b, bool)
            yield index.tolist(), flip
            nimg += self.b * self.world_size

CACHE_BYTES = 1 << 30  # a data set up to this size (uint8) is decoded or rendered once per loader process, then kept

class _Batches(torch.utils.data.Dataset):
    """key (indices [b], flips [b]) -> a whole batch (and its labels), built in a worker. Items of a small
    data set are kept once made: decoding and resizing them (or rendering the built-in scenes, 2 ms of CPU an
    image at 32 px) would otherwise cost small networks a fifth of their training time (sndcgan-cpu)."""

    def __init__(self, dataset, labels=False):
        self.dataset, self.labels = dataset, labels
        self.kept, self.have = None, None  # [N, 3, H, W] uint8, [N] bool: made in the process that fills them

    def item(self, i):
        if self.have is None:  # the first item decides: keep every item if they all fit
            x, self.have = self.dataset[i], np.zeros(len(self.dataset), bool)
            if len(self.dataset) * x.numel() <= CACHE_BYTES:
                self.kept = torch.empty(len(self.dataset), *x.shape, dtype=x.dtype)
                self.kept[i], self.have[i] = x, True
            return x
        if self.kept is None:
            return self.dataset[i]
        if not self.have[i]:
            self.kept[i], self.have[i] = self.dataset[i], True
        return self.kept[i]

    def __getitem__(self, key):
        images = torch.stack([self.item(i) for i in key[0]])                     # [b, 3, H, W] uint8
        flip = torch.from_numpy(key[1])                                           # [b] bool
        images[flip] = images[flip].flip(3)                                       # all x-flips in one op
        return (images, torch.from_numpy(self.dataset.labels[key[0]])) if self.labels else images

STOPS = {signal.SIGINT, signal.SIGTERM}
SIGWAIT = hasattr(signal, 'sigwaitinfo')  # Linux; not macOS or Windows

def leave_stop_signals_to_main(worker_id=None):
    """worker_init_fn of loader workers. Ctrl-C reaches the whole process group and a cluster's SIGTERM
    every process, but the main process may go on to finish its step and checkpoint (train.py), so its
    workers must keep serving it: they take neither signal, except a SIGTERM from their parent (the
    loader ending them), as PyTorch's own worker handler does. Without sigwaitinfo only Ctrl-C is
    ignored. A thread started in the worker before this runs would still take the signals: fork the
    workers with the signals blocked (InfiniteLoader does), so that every thread inherits the mask."""
    if not SIGWAIT:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)  # threads started from now on inherit it

    def wait():
        while True:
            info = signal.sigwaitinfo(STOPS)
            if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
                os._exit(0)
    threading.Thread(target=wait, daemon=True).start()

class InfiniteLoader:
    """Iterator over this rank's uint8 batches [batch_size, 3, H, W] (batch_size is per rank), forever;
    labels=True: (images, int64 classes [batch_size]) pairs."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, start_nimg=0, mirror=False, workers=2, device='cpu',
                 labels=False):
        self.dataset, self.device = dataset, torch.device(device)
        sampler = _BatchSampler(len(dataset), batch_size, rank, world_size, seed, start_nimg, mirror)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS) if SIGWAIT else None  # while the workers fork
        try:
            self._iter = iter(torch.utils.data.DataLoader(  # batch_size=None: each sampler item is one whole batch
                _Batches(dataset, labels), sampler=sampler, batch_size=None, num_workers=workers, pin_memory=self.device.type == 'cuda',
                persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                worker_init_fn=leave_stop_signals_to_main))
        finally:
            if SIGWAIT:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._iter)
        except DataError as e:  # a worker's DataError arrives wrapped in a traceback: keep its own one line
            raise DataError(str(e).strip().splitlines()[-1].split('DataError: ', 1)[-1]) from None
        if isinstance(batch, (tuple, list)):  # (images, labels)
            return tuple(t.to(self.device, non_blocking=True) for t in batch)
        return batch.to(self.device, non_blocking=True)

def save_grid(images, path, cols=None, zoom=1):
    """uint8 [N, 3, H, W] (tensor or array) -> one PNG, `cols` images per row (default: about square),
    row-major, empty cells black, each pixel a zoom x zoom square."""
    images = torch.as_tensor(images).cpu()
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, (images.dtype, images.shape)
    n, _, h, w = images.shape
    r = max(1, math.isqrt(n))  # default: about square, a divisor of n if one is near (32: 8 x 4, not 7 x 5 and 3 empty)
    cols = cols or next((c for c in range(r, 2 * r + 1) if n % c == 0), -(-n // r))
    rows = -(-n // cols)
    grid = torch.zeros(rows * cols, 3, h, w, dtype=torch.uint8)                  # empty cells stay black
    grid[:n] = images
    grid = grid.view(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)  # [rows H, cols W, 3]
    img = Image.fromarray(grid.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).numpy())
    atomic_write(path, lambda f: img.save(f, format='PNG'))

def atomic_write(path, write, mode='wb'):
    """write(f) into path + '.tmp', on disk (fsync), then renamed over path: a crash, a full disk or a
    kill leaves the old file (or none), never a partial one. The tmp file is removed on any failure."""
    tmp = os.fspath(path) + '.tmp'
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the .tmp (or a file object)
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
    finally:  # also after a Ctrl-C that stops at once
        if os.path.exists(tmp):
            os.remove(tmp)

# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description='Write a grid of one batch and time the loader, or --check a dataset.')
    p.add_argument('--data', default=None, help='folder or .zip of images (default: the built-in synthetic dataset)')
    p.add_argument('--resolution', type=int, default=64, help='image size in pixels, a power of two')
    p.add_argument('--batch', type=int, default=64, help='images per batch')
    p.add_argument('--batches', type=int, default=10, help='batches to time after the first')
    p.add_argument('--workers', type=int, default=2, help='loader worker processes (0: load in this process)')
    p.add_argument('--max-images', type=int, default=None, help='keep the first N images')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--mirror', action='store_true', help='random x-flips')
    p.add_argument('--skip-bad', action='store_true', help='drop unreadable / too small images instead of stopping')
    p.add_argument('--out', default='grid.png', help='where to write the grid')
    p.add_argument('--check', action='store_true', help='decode every image of --data and list all bad files')
    args = p.parse_args(argv)
    try:
        if args.check:
            if args.data is None:
                raise DataError('--check needs --data PATH (the built-in dataset has no files to check)')
            bad = check_images(args.data, args.resolution)
            for name, why in bad:
                print(f'{name}: {why}')
            print(f'{len(bad)} bad file(s) under {args.data}' + (' (pass --skip-bad to train without them)' if bad else ''))
            return 1 if bad else 0
        torch.set_num_threads(1)  # with --workers 0, the timing is of one core
        ds = make_dataset(args.data, args.resolution, args.max_images, args.seed, args.skip_bad)
        loader = InfiniteLoader(ds, args.batch, seed=args.seed, mirror=args.mirror, workers=args.workers)
        save_grid(next(loader), args.out)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        speed = args.batches * args.batch / (time.perf_counter() - t)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{ds.name}: {len(ds)} images at {args.resolution}x{args.resolution}; wrote {args.out}; '
          f'loading {speed:.0f} img/s with {args.workers} worker(s)')
    return 0

if __name__ == '__main__':
    sys.exit(main())

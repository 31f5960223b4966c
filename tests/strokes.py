"""Pen strokes from MNIST images, so that a browser test can draw real handwriting: the digit is
scaled up, thinned to a one-pixel skeleton (Zhang-Suen) and the skeleton walked into polylines."""
import numpy as np
from PIL import Image, ImageDraw

STEPS = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]  # straight steps first


def thin(mask):
    """Zhang-Suen thinning of a boolean image to a skeleton one pixel wide."""
    img = np.pad(mask.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            c = img[1:-1, 1:-1]
            # neighbours p2..p9 clockwise from north
            p = [img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:], img[2:, 1:-1], img[2:, :-2],
                 img[1:-1, :-2], img[:-2, :-2]]
            b = sum(q.astype(int) for q in p)
            a = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(int) for i in range(8))
            if step == 0:
                side = (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
            else:
                side = (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
            drop = (c == 1) & (b >= 2) & (b <= 6) & (a == 1) & side
            if drop.any():
                c[drop] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def trace(skeleton, min_len=6):
    """Polylines [(y, x), ...] that cover the skeleton: walks from its ends (then around its loops),
    each ending on the pixel it meets, so that loops close and branches join."""
    pts = set(zip(*map(list, np.nonzero(skeleton))))

    def around(q):
        return [(q[0] + dy, q[1] + dx) for dy, dx in STEPS if (q[0] + dy, q[1] + dx) in pts]

    ends = sorted(q for q in pts if len(around(q)) == 1)
    left, paths = set(pts), []
    while left:
        start = next((q for q in ends if q in left), None) or min(left)
        path = [start]
        left.discard(start)
        while True:
            ahead = [q for q in around(path[-1]) if q in left]
            if not ahead:
                break
            path.append(ahead[0])
            left.discard(ahead[0])
        meet = [q for q in around(path[-1]) if q not in path[-3:]]
        if meet:
            path.append(meet[0])
        if len(path) >= min_len:
            paths.append(path)
    return paths


def digit_strokes(digit, canvas=280, up=4, every=3):
    """Strokes [[(x, y), ...], ...] in canvas pixels that redraw a 28x28 white-on-black digit."""
    size = digit.shape[0] * up
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.BICUBIC)) > 110
    scale = canvas / size
    strokes = []
    for path in trace(thin(big)):
        keep = path[::every] + ([path[-1]] if (len(path) - 1) % every else [])
        strokes.append([((x + 0.5) * scale, (y + 0.5) * scale) for y, x in keep])
    return strokes


def render(strokes, canvas=280, pen=20):
    """The strokes as the page draws them (dark round pen on white), for checks without a browser."""
    im = Image.new("L", (canvas, canvas), 255)
    d = ImageDraw.Draw(im)
    for s in strokes:
        for (x0, y0), (x1, y1) in zip(s, s[1:]):
            d.line([(x0, y0), (x1, y1)], fill=17, width=pen)
        for x, y in s:
            d.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=17)
    return im

"""SPEC.md written out a second time, independently of fastkd.reference: explicit Python loops
over float64 scalars. Slow, so only for small shapes; it checks the reference itself."""

from __future__ import annotations

import math

EPS = 1e-12


def _normalize(rows):
    out = []
    for r in rows:
        n = max(math.sqrt(sum(v * v for v in r)), EPS)
        out.append([v / n for v in r])
    return out


def _kernel(rows):
    a = _normalize(rows)
    return [[sum(x * y for x, y in zip(ai, aj, strict=True)) for aj in a] for ai in a]


def fkd(student, teachers, kd_weight, fr_weight):
    b, ds = len(student), len(student[0])
    rs = _kernel(student)
    kts = [_kernel(t) for t in teachers]
    rt = [[sum(k[i][j] for k in kts) / len(kts) for j in range(b)] for i in range(b)]
    distil = sum((rs[i][j] - rt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    featreg = sum(v * v for r in student for v in r) / (b * ds)
    return kd_weight * distil + fr_weight * featreg


def fkd_student_grad(student, teachers, kd_weight, fr_weight):
    """SPEC §1 gradient formula: G = (4/B^2)(rho_S - rho_T) A, then the normalisation chain rule."""
    b, ds = len(student), len(student[0])
    a = _normalize(student)
    rs = _kernel(student)
    kts = [_kernel(t) for t in teachers]
    rt = [[sum(k[i][j] for k in kts) / len(kts) for j in range(b)] for i in range(b)]
    grad = []
    for i in range(b):
        g = [4 / b**2 * sum((rs[i][j] - rt[i][j]) * a[j][k] for j in range(b)) for k in range(ds)]
        ga = sum(g[k] * a[i][k] for k in range(ds))
        norm = max(math.sqrt(sum(v * v for v in student[i])), EPS)
        grad.append(
            [
                kd_weight * (g[k] - ga * a[i][k]) / norm + fr_weight * 2 * student[i][k] / (b * ds)
                for k in range(ds)
            ]
        )
    return grad


def sp(student, teacher):
    def gram(rows):
        g = [[sum(x * y for x, y in zip(ri, rj, strict=True)) for rj in rows] for ri in rows]
        return _normalize(g)

    gs, gt = gram(student), gram(teacher)
    b = len(student)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def rkd_distance(student, teacher):
    def dist(rows):
        b = len(rows)
        d = [[0.0] * b for _ in range(b)]
        for i in range(b):
            for j in range(b):
                if i != j:
                    sq = sum(x * x for x in rows[i]) + sum(y * y for y in rows[j])
                    sq -= 2 * sum(x * y for x, y in zip(rows[i], rows[j], strict=True))
                    d[i][j] = math.sqrt(max(sq, 1e-12))
        pos = [v for r in d for v in r if v > 0]
        m = sum(pos) / len(pos)
        return [[v / m for v in r] for r in d]

    ds, dt = dist(student), dist(teacher)
    b = len(student)
    total = 0.0
    for i in range(b):
        for j in range(b):
            x = abs(ds[i][j] - dt[i][j])
            total += 0.5 * x * x if x < 1 else x - 0.5
    return total / b**2


def _batch_norm(cols_rows, eps):
    b, d = len(cols_rows), len(cols_rows[0])
    mu = [sum(cols_rows[i][k] for i in range(b)) / b for k in range(d)]
    var = [sum((cols_rows[i][k] - mu[k]) ** 2 for i in range(b)) / b for k in range(d)]
    sig = [math.sqrt(v + eps) for v in var]
    return [[(cols_rows[i][k] - mu[k]) / sig[k] for k in range(d)] for i in range(b)], sig


def srd(zs, zt, p, eps):
    s, _ = _batch_norm(zs, eps)
    t, _ = _batch_norm(zt, eps)
    total = sum(abs(s[i][k] - t[i][k]) ** p for i in range(len(zs)) for k in range(len(zs[0])))
    return math.log(max(total, 1.1754943508222875e-38))


def srd_student_grad(zs, zt, p, eps):
    """SPEC §3 train-mode gradient: dzs = (g - mean g - s mean(g s)) / sigma_s, g = h / S."""
    b, d = len(zs), len(zs[0])
    s, sig = _batch_norm(zs, eps)
    t, _ = _batch_norm(zt, eps)
    diff = [[s[i][k] - t[i][k] for k in range(d)] for i in range(b)]
    total = sum(abs(v) ** p for r in diff for v in r)
    h = [[p * abs(v) ** (p - 1) * math.copysign(1.0, v) if v else 0.0 for v in r] for r in diff]
    g = [[v / total for v in r] for r in h]
    out = [[0.0] * d for _ in range(b)]
    for k in range(d):
        mg = sum(g[i][k] for i in range(b)) / b
        mgs = sum(g[i][k] * s[i][k] for i in range(b)) / b
        for i in range(b):
            out[i][k] = (g[i][k] - mg - s[i][k] * mgs) / sig[k]
    return out


def numerical_gradient(f, args, h=1e-6):
    """Central differences of the scalar ``f(*args)`` with respect to every entry of every
    argument (lists of rows of float64 scalars): a gradient computed from the formulas above
    only, independent of autograd. Accurate to about 1e-9 of the gradient's scale."""
    grads = []
    for a, rows in enumerate(args):
        grad = []
        for i, row in enumerate(rows):
            out = []
            for k in range(len(row)):

                def at(v, a=a, i=i, k=k):
                    moved = [r[:] for r in args[a]]
                    moved[i][k] = v
                    return f(*args[:a], moved, *args[a + 1 :])

                out.append((at(row[k] + h) - at(row[k] - h)) / (2 * h))
            grad.append(out)
        grads.append(grad)
    return grads

"""VAE: BatchNorm in a variational autoencoder on Fashion-MNIST, and BN-VAE against posterior
collapse (Zhu et al. 2020, "A Batch Normalized Inference Network Keeps the KL Vanishing
Away").

An MLP encoder gives a diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)) over d
latent units; the prior is N(0, I); pixels in [0, 1] are scored with the Bernoulli
log-likelihood (binary cross-entropy on logits). Three encoders/decoders:

* ``none``: no normalization;
* ``bn``: bnkit BatchNorm1d after every hidden layer of the encoder and the decoder;
* ``bnvae``: the plain networks with a bnkit BatchNorm1d on the posterior means whose scale
  gamma is fixed (not trained; the shift beta is). Over a training batch the mean of mu_i^2
  is then gamma^2 + beta_i^2 >= gamma^2 (times v / (v + eps), v the batch variance before
  the BN), and since the KL of one unit is (mu^2 + sigma^2 - log sigma^2 - 1) / 2 >= mu^2 / 2,
  the batch's mean KL is at least d * gamma^2 / 2: the posterior cannot collapse onto the
  prior.

Two decoders: ``plain`` (an MLP from z to all pixels) and ``rows``, an autoregressive decoder
over image rows strong enough to model the images without z (as PixelCNN-like decoders do,
the usual cause of posterior collapse): row t is predicted from the two rows above it, z and
a learned embedding of t, so p(x|z) = prod_t p(row_t | row_{t-1}, row_{t-2}, z). Training
feeds the true rows (teacher forcing); reconstructions and samples in the figure are decoded
row by row from the decoder's own output (pixel probabilities), reconstructions from z = mu.

Measured on test images (eval mode, one z sample per image): the negative ELBO
(reconstruction + KL, nats per image), the KL, the reconstruction term, and the number of
active units (Burda et al. 2016: latent units whose posterior mean varies across the data
with variance above 0.01).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as bnn
from . import plots
from .sections import Section, Table, by, combine, compare, fmt, mean, metric
from .train import subset

NAME = "vae"
TITLE = "BN in a VAE and BN-VAE against posterior collapse"
CLAIM = ("With a decoder strong enough to ignore the latent code, a batch-normalized "
         "posterior mean with fixed scale (BN-VAE, Zhu et al. 2020) keeps the KL term away "
         "from zero where the plain VAE collapses, and reaches a better ELBO.")
NORMS = ("none", "bn", "bnvae")
DECODERS = ("plain", "rows")
LABELS = {"none": "VAE", "bn": "BN enc+dec", "bnvae": "BN-VAE"}
COLLAPSED = 0.5  # nats: a mean KL below this carries almost no information about x

_BASE = {"hidden": 64, "latent": 16, "gamma": 0.7, "batch": 64, "lr": 2e-3,
         "au_threshold": 0.01, "show": 8, "norms": list(NORMS), "decoders": list(DECODERS)}
PROFILES = {
    "mini": {**_BASE, "hidden": 16, "latent": 4, "batch": 16, "steps": 6, "train_subset": 128,
             "test_subset": 64, "show": 3},
    "quick": {**_BASE, "steps": 220, "train_subset": None, "test_subset": 1000},
    "full": {**_BASE, "hidden": 128, "lr": 1e-3, "steps": 1000, "train_subset": None,
             "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    return None


def cells(cfg: dict) -> list[dict]:
    return [{"decoder": d, "norm": n} for d in cfg["decoders"] for n in cfg["norms"]]


# ----------------------------------------------------------------------------- model

def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)


def _mlp(sizes, bn: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (and BatchNorm1d before each ReLU when bn)."""
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [bnn.BatchNorm1d(b)] if bn else []
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (N, P) -> (mu, logvar), each (N, d). norm 'bnvae' batch-normalizes mu with a fixed
    scale gamma (the BN's weight, frozen) and a trained shift."""

    def __init__(self, pixels: int, hidden: int, latent: int, norm: str, gamma: float):
        super().__init__()
        self.body = _mlp([pixels, hidden, hidden], norm == "bn")
        self.body.append(bnn.BatchNorm1d(hidden) if norm == "bn" else nn.Identity())
        self.body.append(nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.mu_bn = None
        if norm == "bnvae":
            self.mu_bn = bnn.BatchNorm1d(latent)
            with torch.no_grad():
                self.mu_bn.weight.fill_(gamma)
            self.mu_bn.weight.requires_grad_(False)

    def forward(self, x):
        h = self.body(x)
        mu = self.mu(h)
        return (mu if self.mu_bn is None else self.mu_bn(mu)), self.logvar(h)


class PlainDecoder(nn.Module):
    """z (N, d) -> pixel logits (N, S*S) through an MLP; x is not used."""

    def __init__(self, side: int, hidden: int, latent: int, bn: bool):
        super().__init__()
        self.net = _mlp([latent, hidden, hidden, side * side], bn)

    def forward(self, z, x):
        return self.net(z)

    def generate(self, z):
        return torch.sigmoid(self.net(z))


class RowDecoder(nn.Module):
    """Autoregressive over rows: the logits of row t from rows t-1 and t-2 (zeros above the
    image), z and a learned embedding of t. forward(z, x) is teacher-forced (all rows at once);
    generate(z) decodes row by row from its own pixel probabilities."""

    def __init__(self, side: int, hidden: int, latent: int, bn: bool):
        super().__init__()
        self.side = side
        self.rows_in = nn.Linear(2 * side, hidden)
        self.z_in = nn.Linear(latent, hidden)
        self.where = nn.Parameter(torch.zeros(side, hidden))
        self.norm = bnn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden),
                                 bnn.BatchNorm1d(hidden) if bn else nn.Identity(), nn.ReLU(),
                                 nn.Linear(hidden, side))

    def _logits(self, above: torch.Tensor, z: torch.Tensor, first: int = 0) -> torch.Tensor:
        """above (N, T, 2S): the two rows above each of rows first..first+T-1 -> their
        logits (N, T, S)."""
        n, t, _ = above.shape
        h = self.rows_in(above) + self.z_in(z)[:, None] + self.where[first:first + t]
        h = self.norm(h.reshape(n * t, -1))
        return self.out(h).reshape(n, t, self.side)

    def forward(self, z, x):
        rows = x.reshape(len(x), self.side, self.side)
        pad = F.pad(rows, (0, 0, 2, 0))  # two zero rows on top
        above = torch.cat([pad[:, 1:-1], pad[:, :-2]], -1)  # (row t-1, row t-2) for each t
        return self._logits(above, z).reshape(len(x), -1)

    def generate(self, z):
        n, s = len(z), self.side
        rows = torch.zeros(n, s + 2, s, dtype=z.dtype)
        for t in range(s):
            above = torch.cat([rows[:, t + 1], rows[:, t]], -1)[:, None]
            rows[:, t + 2] = torch.sigmoid(self._logits(above, z, t)[:, 0])
        return rows[:, 2:].reshape(n, -1)


class VAE(nn.Module):
    """Encoder + decoder; forward(x, generator) -> (recon, kl) per image, in nats."""

    def __init__(self, cfg: dict, decoder: str, norm: str, side: int = 28):
        super().__init__()
        self.encoder = Encoder(side * side, cfg["hidden"], cfg["latent"], norm, cfg["gamma"])
        dec = PlainDecoder if decoder == "plain" else RowDecoder
        self.decoder = dec(side, cfg["hidden"], cfg["latent"], norm == "bn")

    def forward(self, x, generator=None):
        mu, logvar = self.encoder(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        logits = self.decoder(z, x)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        return recon, gaussian_kl(mu, logvar), mu


# ----------------------------------------------------------------------------- cells

def _hex(images: torch.Tensor) -> list[str]:
    """(k, P) values in [0, 1] -> k hex strings of uint8 pixels (compact in metrics.jsonl)."""
    q = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return [bytes(row.tolist()).hex() for row in q]


def _unhex(items: list[str]) -> list[list[float]]:
    return [[b / 255 for b in bytes.fromhex(s)] for s in items]


@torch.no_grad()
def evaluate_vae(model: VAE, x: torch.Tensor, cfg: dict, seed: int,
                 images: bool = True) -> dict:
    """Test metrics in eval mode (one z sample per image, seeded); with `images`, the first
    `show` test images, their reconstructions and as many samples, as hex strings."""
    model.eval()
    gen = torch.Generator().manual_seed(20_000 + seed)
    recon, kl, mu = [], [], []
    for xb in x.split(500):
        r, k, m = model(xb, gen)
        recon.append(r)
        kl.append(k)
        mu.append(m)
    recon_t, kl_t, mu_t = torch.cat(recon), torch.cat(kl), torch.cat(mu)
    active = int((mu_t.double().var(0) > cfg["au_threshold"]).sum()) if len(mu_t) > 1 else 0
    out = {"recon": float(recon_t.mean()), "kl": float(kl_t.mean()),
           "neg_elbo": float((recon_t + kl_t).mean()), "active_units": active}
    if images:
        show = x[:cfg["show"]]
        prior = torch.randn(cfg["show"], cfg["latent"], generator=gen)
        out["images"] = {"input": _hex(show),
                         "recon": _hex(model.decoder.generate(model.encoder(show)[0])),
                         "sample": _hex(model.decoder.generate(prior))}
    return out


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), cfg["train_subset"], cfg["test_subset"])
    torch.manual_seed(seed)
    model = VAE(cfg, variant["decoder"], variant["norm"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    x, kl_train = data.x_train, []
    model.train()
    with ctx.bar(cfg["steps"], f"{variant['decoder']} decoder, {LABELS[variant['norm']]}") as bar:
        for step in range(cfg["steps"]):
            idx = torch.randint(0, len(x), (cfg["batch"],), generator=gen)
            recon, kl, _ = model(x[idx], gen)
            loss = (recon + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            kl_train.append(float(kl.detach().mean()))
            bar.advance()
    tail = max(1, len(kl_train) // 10)
    # the figure shows one seed's images: the others' would only grow metrics.jsonl
    return {**evaluate_vae(model, data.x_test, cfg, seed, images=seed == 0),
            "kl_train_last": sum(kl_train[-tail:]) / tail}


# ----------------------------------------------------------------------------- summary

def bound(cfg: dict) -> float:
    """BN-VAE's lower bound on the mean KL over a training batch: d * gamma^2 / 2."""
    return cfg["latent"] * cfg["gamma"] ** 2 / 2


def _m(groups, decoder, norm, name) -> list:
    return metric(groups.get((decoder, norm), []), name)


def _describe(groups, decoder: str, norms) -> str:
    parts = []
    for n in norms:
        kl = _m(groups, decoder, n, "kl")
        state = " (collapsed)" if kl and mean(kl) < COLLAPSED else ""
        parts.append(f"{LABELS[n]} -ELBO {fmt(_m(groups, decoder, n, 'neg_elbo'))}, KL "
                     f"{fmt(kl, digits=2)}{state}, active units "
                     f"{fmt(_m(groups, decoder, n, 'active_units'), digits=1)}")
    return "; ".join(parts)


def _text(cfg, groups) -> tuple[str, list[str]]:
    norms = cfg["norms"]
    out = [(f"Test negative ELBO and KL in nats per image after {cfg['steps']:,} Adam steps "
           f"(batch {cfg['batch']}, {cfg['latent']} latent units). Plain MLP decoder: "
           f"{_describe(groups, 'plain', norms)}. Autoregressive row decoder: "
           f"{_describe(groups, 'rows', norms)}.")]
    if not {"none", "bnvae"} <= set(norms) or "rows" not in cfg["decoders"]:
        return "not run", out + ["The claim needs the VAE and BN-VAE with the row decoder."]
    kl_check = compare(_m(groups, "rows", "bnvae", "kl"), _m(groups, "rows", "none", "kl"),
                       "a > b")
    elbo_check = compare(_m(groups, "rows", "none", "neg_elbo"),
                         _m(groups, "rows", "bnvae", "neg_elbo"), "a > b")
    verdict = combine([kl_check, elbo_check])
    plain_kl = mean(_m(groups, "rows", "none", "kl"))
    mlp_kl = mean(_m(groups, "plain", "none", "kl"))
    collapsed = plain_kl < COLLAPSED
    out.append(f"With the row decoder, BN-VAE's KL above the plain VAE's: {kl_check}; BN-VAE's "
               f"negative ELBO below the plain VAE's: {elbo_check} (two standard errors of the "
               f"seed-to-seed spread decide). BN-VAE's bound d * gamma^2 / 2 = "
               f"{bound(cfg):.2f} nats holds for the mean over a training batch (measured over "
               f"the last tenth of training: "
               f"{fmt(_m(groups, 'rows', 'bnvae', 'kl_train_last'), digits=2)}); its test KL "
               f"(eval mode, running statistics) was "
               f"{fmt(_m(groups, 'rows', 'bnvae', 'kl'), digits=2)}. The plain VAE "
               + ("collapsed" if collapsed else "did not collapse fully")
               + f" with the row decoder: KL {plain_kl:.2f} nats against {mlp_kl:.2f} with the "
               f"MLP decoder (collapsed means below {COLLAPSED}).")
    if verdict == "holds":
        out.append("The claim holds in this run, as Zhu et al. 2020 report (on text, with "
                   "LSTM decoders).")
    elif verdict == "does not hold":
        out.append("The claim does NOT hold in this run, contrary to Zhu et al. 2020.")
    else:
        out.append(f"The run does not confirm the claim as a whole ({verdict}): "
                   + ("BN-VAE kept the KL up, " if kl_check == "holds" else
                      "BN-VAE did not decidably keep the KL higher, ")
                   + ("and its ELBO was better." if elbo_check == "holds" else
                      f"but its ELBO was {_WORSE[elbo_check]}; Zhu et al. 2020 report a better "
                      "one (on text, with LSTM decoders)."))
    if "bn" in norms:
        bn_kl = mean(_m(groups, "rows", "bn", "kl"))
        bn_elbo = mean(_m(groups, "rows", "bn", "neg_elbo"))
        plain_elbo = mean(_m(groups, "rows", "none", "neg_elbo"))
        out.append(f"BN in the encoder and decoder (no fixed scale) gave a KL of {bn_kl:.2f} "
                   f"nats with the row decoder ({'above' if bn_kl > plain_kl else 'below'} the "
                   f"plain VAE's {plain_kl:.2f}) and a negative ELBO of {bn_elbo:.1f} "
                   f"({'below' if bn_elbo < plain_elbo else 'above'} the plain VAE's "
                   f"{plain_elbo:.1f}).")
    return verdict, out


_WORSE = {"does not hold": "worse", "inconclusive": "not decidably better"}


def _grid(groups, cfg) -> tuple[list, list[str]]:
    """Rows of images (each a list of S x S arrays) and their labels, from the first seed."""
    rows, labels = [], []
    for d in cfg["decoders"]:
        for n in cfg["norms"]:
            recs = sorted((r for r in groups.get((d, n), []) if "images" in r["metrics"]),
                          key=lambda r: r["seed"])
            if not recs:
                continue
            imgs = recs[0]["metrics"]["images"]
            if not rows:
                rows.append(_unhex(imgs["input"]))
                labels.append("test images")
            rows.append(_unhex(imgs["recon"]) + _unhex(imgs["sample"]))
            labels.append(f"{d}, {LABELS[n]}")
    return rows, labels


def _figure(cfg, groups):
    import numpy as np

    fig, axes = plots.figure(3, 1, width=3.6, height=3.2)
    fig.set_size_inches(fig.get_figwidth(), 8.0)
    fig.subplots_adjust(bottom=0.62, top=0.95)
    names = [(d, n) for d in cfg["decoders"] for n in cfg["norms"]]
    for ax, (key, title) in zip(axes, (("neg_elbo", "negative ELBO (nats)"),
                                       ("kl", "KL (nats)"), ("recon", "reconstruction (nats)"))):
        for i, (d, n) in enumerate(names):
            vals = [v for v in _m(groups, d, n, key) if v is not None]
            if vals:
                ax.bar(i, mean(vals), color=plots.COLORS[NORMS.index(n)],
                       hatch="//" if d == "rows" else None, edgecolor="k", lw=0.5,
                       label=f"{LABELS[n]}" if d == cfg["decoders"][-1] else None)
                ax.plot([i] * len(vals), vals, "k.", ms=3)
        if key == "kl":
            ax.axhline(bound(cfg), color="k", ls=":", lw=0.8)
        ax.set_xticks(range(len(names)), [f"{d}\n{LABELS[n]}" for d, n in names], fontsize=6)
        plots.finish(ax, title + ("; dotted: BN-VAE bound" if key == "kl" else ""), "", "",
                     legend=False)
        if key == "kl":
            ax.legend(fontsize=8, loc="upper right", title="hatched: row decoder",
                      title_fontsize=7)
    rows, labels = _grid(groups, cfg)
    if rows:
        side, show = math.isqrt(len(rows[0][0])), len(rows[0])
        cell = side + 2
        width = max(len(r) for r in rows)
        # light grey between tiles, a wider gap between reconstructions and samples
        canvas = np.full((len(rows) * cell, width * cell + side), 0.12)
        for i, row in enumerate(rows):
            for j, img in enumerate(row):
                left = j * cell + (side if j >= show else 0)
                canvas[i * cell:i * cell + side, left:left + side] = \
                    np.asarray(img).reshape(side, side)
        grid = fig.add_axes((0.16, 0.03, 0.82, 0.5))
        grid.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        grid.set_xticks([])
        grid.set_yticks([(side + 2) * i + side / 2 for i in range(len(rows))], labels,
                        fontsize=7)
        grid.set_title(f"first seed: {show} reconstructions (decoded from z = mu) | {show} "
                       "samples from the prior", fontsize=9)
    return fig


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "decoder", "norm")
    verdict, paragraphs = _text(cfg, groups)
    rows = [[d, LABELS[n], fmt(_m(groups, d, n, "neg_elbo")), fmt(_m(groups, d, n, "kl"),
                                                                   digits=2),
             fmt(_m(groups, d, n, "recon")), fmt(_m(groups, d, n, "active_units"))]
            for d in cfg["decoders"] for n in cfg["norms"]]
    kl = {n: mean(_m(groups, "rows", n, "kl")) for n in ("none", "bnvae")}
    headline = (f"row decoder KL: BN-VAE {kl['bnvae']:.2f} vs VAE {kl['none']:.2f} nats"
                if not math.isnan(kl["none"] + kl["bnvae"]) else "a variant has not finished")
    table = Table(["decoder", "model", "-ELBO (nats)", "KL (nats)", "reconstruction (nats)",
                   "active units"], rows)
    return Section(NAME, TITLE, CLAIM, headline, verdict, paragraphs, table,
                   _figure(cfg, groups))

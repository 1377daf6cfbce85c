"""Tests of the lab's `vae` experiment: a mini run on the tiny data set, the verdict following
the metrics, the KL against torch.distributions, BN-VAE's bound and the row decoder's
causality."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from bnkit.lab import store, vae


@pytest.fixture(scope="module")
def mini_run(mini_lab):
    return mini_lab("vae")


def test_mini_run_trains_every_model_and_shows_images(mini_run):
    cfg, res = mini_run
    exp = cfg["experiments"]["vae"]
    assert res.status == "finished" and res.errors == 0
    recs = store.read_records(res.run_dir)
    assert len(recs) == 2 * len(exp["norms"]) * len(exp["decoders"])
    for r in recs:
        m = r["metrics"]
        assert m["kl"] >= 0 and m["recon"] > 0
        assert m["neg_elbo"] == pytest.approx(m["recon"] + m["kl"])
        assert 0 <= m["active_units"] <= exp["latent"]
        if r["seed"] == 0:  # the figure's images: first seed only
            for kind in ("input", "recon", "sample"):
                assert len(m["images"][kind]) == exp["show"]
                assert all(len(bytes.fromhex(s)) == 28 * 28 for s in m["images"][kind])
        else:
            assert "images" not in m
        if r["variant"]["norm"] == "bnvae":  # training batches obey BN-VAE's bound
            assert m["kl_train_last"] >= vae.bound(exp) * 0.99
    md = res.report_md.read_text()
    assert vae.TITLE in md and "Zhu et al. 2020" in md
    assert (res.run_dir / "plots" / "vae.png").read_bytes()[:4] == b"\x89PNG"


def _records(kl_bnvae, kl_vae, elbo_bnvae, elbo_vae) -> list[dict]:
    image = [bytes(28 * 28).hex()]
    recs = []
    for seed in range(3):
        for decoder in ("plain", "rows"):
            for norm, kl, elbo in (("none", kl_vae[seed], elbo_vae[seed]),
                                   ("bn", kl_vae[seed], elbo_vae[seed]),
                                   ("bnvae", kl_bnvae[seed], elbo_bnvae[seed])):
                recs.append({"variant": {"decoder": decoder, "norm": norm}, "seed": seed,
                             "metrics": {"kl": kl, "recon": elbo - kl, "neg_elbo": elbo,
                                         "active_units": 4, "kl_train_last": kl,
                                         "images": {"input": image, "recon": image,
                                                    "sample": image}}})
    return recs


def test_verdict_follows_the_metrics():
    cfg = vae.PROFILES["quick"]
    holds = vae.summarize(cfg, _records([5.0, 5.1, 5.2], [0.1, 0.2, 0.1],
                                        [240.0, 241.0, 242.0], [250.0, 251.0, 252.0]))
    assert holds.verdict == "holds"
    text = " ".join(holds.paragraphs)
    assert "The plain VAE collapsed with the row decoder: KL 0.13 nats" in text
    assert "as Zhu et al. 2020 report" in text
    flipped = vae.summarize(cfg, _records([0.1, 0.2, 0.1], [5.0, 5.1, 5.2],
                                          [250.0, 251.0, 252.0], [240.0, 241.0, 242.0]))
    assert flipped.verdict == "does not hold"
    assert "does NOT hold in this run, contrary to Zhu et al. 2020" in " ".join(
        flipped.paragraphs)
    mixed = vae.summarize(cfg, _records([5.0, 5.1, 5.2], [0.1, 0.2, 0.1],
                                        [250.0, 251.0, 252.0], [240.0, 241.0, 242.0]))
    assert mixed.verdict == "mixed"


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.gaussian_kl(mu, logvar), want)
    assert torch.equal(vae.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


@pytest.mark.parametrize("decoder", ["plain", "rows"])
def test_bn_vae_keeps_the_batch_mean_kl_above_its_bound(decoder):
    """Training mode: the batch's mean of mu_i^2 is gamma^2 v_i / (v_i + eps) + beta_i^2, v_i
    the biased batch variance of the pre-BN mean, so the mean KL is >= d gamma^2 / 2 (up to
    the factor v / (v + eps)) whatever the input and the weights."""
    cfg = {**vae.PROFILES["mini"], "latent": 6, "gamma": 0.7}
    torch.manual_seed(1)
    model = vae.VAE(cfg, decoder, "bnvae").double().train()
    seen = {}
    model.encoder.mu.register_forward_hook(lambda m, i, out: seen.update(pre=out.detach()))
    with torch.no_grad():
        model.encoder.mu_bn.bias.normal_()
        model.encoder.logvar.bias.fill_(3.0)  # wide posteriors: the sigma terms do not help
    x = torch.rand(32, 784, dtype=torch.float64)
    _, kl, mu = model(x)
    beta, eps = model.encoder.mu_bn.bias.detach(), model.encoder.mu_bn.eps
    v = seen["pre"].var(0, unbiased=False)
    want = 0.49 * v / (v + eps) + beta.pow(2)
    torch.testing.assert_close(mu.pow(2).mean(0).detach(), want)
    assert float(kl.detach().mean()) >= float(want.sum()) / 2
    with torch.no_grad():
        model.encoder.mu.weight.mul_(1000.0)  # v >> eps: the bound d gamma^2 / 2 itself
        model.encoder.mu_bn.bias.zero_()
    _, kl, _ = model(x)
    assert float(kl.detach().mean()) >= vae.bound(cfg) * (1 - 1e-6)
    assert vae.bound(cfg) == pytest.approx(6 * 0.49 / 2)
    assert not model.encoder.mu_bn.weight.requires_grad  # the scale stays fixed


@pytest.mark.parametrize("bn", [False, True])
def test_row_decoder_is_autoregressive_and_generate_matches_forward(bn):
    torch.manual_seed(2)
    dec = vae.RowDecoder(28, 16, 4, bn).double().eval()
    z, x = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 784, dtype=torch.float64)
    logits = dec(z, x).reshape(3, 28, 28)
    changed = x.reshape(3, 28, 28).clone()
    changed[:, 10:] = torch.rand(3, 18, 28, dtype=torch.float64)
    again = dec(z, changed.reshape(3, -1)).reshape(3, 28, 28)
    torch.testing.assert_close(again[:, :11], logits[:, :11])  # rows 0..10 see rows < 10 only
    assert not torch.allclose(again[:, 11:], logits[:, 11:])
    g = dec.generate(z)  # its own probabilities, row by row
    torch.testing.assert_close(torch.sigmoid(dec(z, g)), g)


def test_images_survive_the_hex_round_trip():
    img = torch.tensor([[0.0, 1.0, 0.5, 0.25]])
    back = vae._unhex(vae._hex(img))
    assert back == [[0.0, 1.0, 128 / 255, 64 / 255]]

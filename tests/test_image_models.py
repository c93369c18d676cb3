import pytest
import torch

from aigc.errors import UserError
from aigc.models.conditioning import Conditioner, build_vocab, encode_captions
from aigc.models.dcgan import DCGANConfig, Discriminator, Generator, n_layers
from aigc.models.diffusion import DiffusionConfig, DiffusionModel, build_unet
from aigc.models.vae import VAE, VAEConfig, kl_divergence


def test_caption_vocabulary_and_unknown_words():
    vocab = build_vocab(["a small red circle at top left", "a large blue square in the center", "红色的圆"])
    ids = encode_captions(["A small RED circle", "红色"], vocab)
    assert ids.shape == (2, 4) and (ids[1, 2:] == 0).all()
    with pytest.raises(UserError, match="never saw these caption words: purple"):
        encode_captions(["a purple circle"], vocab)
    cond = Conditioner("caption", 16, vocab_size=len(vocab))
    a = cond(ids)
    dropped = cond(ids, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], cond.null) and torch.allclose(dropped[1], a[1])
    with pytest.raises(UserError, match="needs a dataset with classes"):
        Conditioner("class", 8, num_classes=0)


@pytest.mark.parametrize("cond_kind", ["none", "class", "caption"])
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3)])
def test_gan_and_vae_shapes(cond_kind, size, channels):
    torch.manual_seed(0)
    cond = {"none": None, "class": torch.tensor([0, 2, 1]), "caption": torch.tensor([[1, 2], [3, 0], [2, 2]])}[cond_kind]
    cfg = DCGANConfig(nz=8, ngf=8, ndf=8)
    G, D = Generator(cfg, size, channels, cond_kind, 3, 4), Discriminator(cfg, size, channels, cond_kind, 3, 4)
    x = G(torch.randn(3, 8), cond)
    assert x.shape == (3, channels, size, size) and x.abs().max() <= 1
    assert D(x, cond).shape == (3,)
    vae = VAE(VAEConfig(latent_dim=4, width=8), size, channels, cond_kind, 3, 4)
    recon, mu, logvar = vae(x.detach(), cond, torch.zeros(3, 4))
    assert recon.shape == x.shape and mu.shape == (3, 4)
    assert torch.allclose(vae.generate(mu, cond), recon)  # zero noise: the decoder sees the mean
    assert (kl_divergence(mu, logvar) >= 0).all()
    assert torch.allclose(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_gan_sizes_must_be_powers_of_two():
    assert n_layers(32) == 3
    with pytest.raises(UserError, match="power of two"):
        n_layers(24)


def test_diffusion_guidance_mixes_conditional_and_null_predictions():
    torch.manual_seed(0)
    cfg = DiffusionConfig(block_out_channels=[8, 16], norm_num_groups=4, attention=False)
    model = DiffusionModel(build_unet(cfg, 8, 3, True), "class", 3).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        c, null = model.cond(labels), model.cond.null_condition(2)
        cond_pred = model(x, t, labels)
        uncond = model(x, t, labels, drop=torch.tensor([True, True]))
        guided = model.guided(x, t, c, null, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond_pred - uncond), atol=1e-5)
    assert torch.allclose(model.guided(x, t, c, null, 1.0), cond_pred, atol=1e-6)
    with pytest.raises(UserError, match="multiples"):
        DiffusionConfig(block_out_channels=[6, 16], norm_num_groups=4).validate()

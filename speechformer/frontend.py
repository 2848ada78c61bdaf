"""Audio as frame vectors: waveforms -> normalised log-mel frames, batched on the model's device.

The frontend is an ``nn.Module`` inside the model, so a checkpoint maps waveforms to text
with nothing else to carry, and training and inference can never disagree about features.

* :class:`LogMelFrontend`: 80-bin log-mel, 25 ms window, 10 ms hop, then global
  mean/variance normalisation with statistics computed from the training data and kept
  as buffers in the checkpoint.
* :class:`WhisperFrontend`: OpenAI Whisper's log-mel (log10, 8-decade dynamic-range clamp,
  ``(x + 4) / 4``) over fixed 30-second windows.
* :class:`SpecAugment`: frequency and time masks, applied in training only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torchaudio
from torch import Tensor, nn

# The audio one Whisper window holds (its frontend pads or cuts to this): defined in the torch-free options
from .options import WHISPER_WINDOW_SECONDS  # noqa: F401


class LogMelFrontend(nn.Module):
    """[B, samples] waveforms -> [B, frames, n_mels] normalised log-mel frames."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25.0,
                 hop_ms: float = 10.0, n_fft: int = 512) -> None:
        super().__init__()
        self.hop_length = int(sample_rate * hop_ms / 1000)
        win_length = int(sample_rate * win_ms / 1000)
        self.n_fft = max(n_fft, win_length)
        # center=False on explicitly zero-padded audio: an utterance gets the same frames
        # alone or padded inside a batch (reflect padding would differ at the end)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=self.n_fft, win_length=win_length,
            hop_length=self.hop_length, n_mels=n_mels, power=2.0, center=False,
        )
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))
        self.register_buffer("stats_frames", torch.zeros((), dtype=torch.long))

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return lengths // self.hop_length + 1

    def log_mel(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised log-mel frames (float32 whatever the autocast) and their lengths."""
        with torch.autocast(device_type=wav.device.type, enabled=False):
            half = self.n_fft // 2
            spectrogram = self.mel.spectrogram  # torchaudio's: its window and settings, its STFT
            stft = torch.stft(torch.nn.functional.pad(wav.float(), (half, half)), spectrogram.n_fft,
                              spectrogram.hop_length, spectrogram.win_length, spectrogram.window, center=False,
                              return_complex=True)
            # the power as re^2 + im^2: torchaudio squares the magnitude (|X| ** 2), and the complex
            # abs was 40% of the frontend on CPU (6 of 16 ms a recipe batch); equal to float32 rounding
            power = stft.real.square() + stft.imag.square()
            x = self.mel.mel_scale(power).clamp_min(1e-10).log().transpose(1, 2)
        return x, self.frame_lengths(lengths)

    def forward(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, frames = self.log_mel(wav, lengths)
        x = (x - self.mean) / self.std
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]
        return x * valid[..., None], frames  # padded frames are 0 (the global mean)

    @torch.no_grad()
    def set_stats(self, total: Tensor, total_sq: Tensor, count: int) -> None:
        """Store global mean/std from sums over ``count`` frames."""
        if count <= 0:
            raise ValueError("cannot compute normalisation statistics from zero frames")
        mean = total / count
        var = (total_sq / count - mean ** 2).clamp_min(1e-8)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt())
        self.stats_frames.fill_(count)

    @property
    def has_stats(self) -> bool:
        return int(self.stats_frames) > 0


@torch.no_grad()
def feature_sums(frontend: LogMelFrontend, wavs: Iterable[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Per-bin sums of the un-normalised log-mel frames of ``wavs`` and of their squares
    (float64), and the frame count: what :meth:`LogMelFrontend.set_stats` takes. Shared by
    training's own statistics and ``speechformer compute-stats``, so both agree exactly."""
    total = torch.zeros(frontend.mean.numel(), dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for wav in wavs:
        feats, frames = frontend.log_mel(wav[None], torch.tensor([len(wav)]))
        x = feats[0, :int(frames[0])].double()
        total += x.sum(0)
        total_sq += (x ** 2).sum(0)
        count += x.shape[0]
    return total, total_sq, count


class WhisperFrontend(nn.Module):
    """OpenAI Whisper's log-mel spectrogram over 30-second windows.

    Exactly as openai-whisper's ``transcribe`` computes a window: the log-mel is taken over
    the audio followed by zeros (so the last real frames see real silence after the
    audio, through a centred STFT), the dynamic-range clamp uses the maximum over those
    frames, and then the frames past the audio (``samples // 160`` of them are kept) are
    set to zero, i.e. the *features* are padded to the 3000 frames of 30 seconds.
    (Padding the audio to 30 s and keeping the log-mel of the silence, as
    ``whisper.pad_or_trim`` on audio does, gives other values there and other transcripts.)
    """

    n_fft = 400
    hop_length = 160
    chunk_samples = int(WHISPER_WINDOW_SECONDS * 16000)
    n_frames = 3000

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000) -> None:
        super().__init__()
        if sample_rate != 16000:
            raise ValueError("Whisper models take 16 kHz audio")
        # Slaney-style mel filters, as librosa.filters.mel (and Whisper's mel_filters.npz) has them
        filters = torchaudio.functional.melscale_fbanks(self.n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels,
                                                        sample_rate, norm="slaney", mel_scale="slaney").T
        self.register_buffer("filters", filters.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return torch.full_like(lengths, self.n_frames)

    def log_mel(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if wav.shape[1] > self.chunk_samples:
            raise ValueError(f"Whisper frontend takes at most {WHISPER_WINDOW_SECONDS:g} s per window, "
                             f"got {wav.shape[1] / 16000:.1f} s")
        with torch.autocast(device_type=wav.device.type, enabled=False):
            wav = wav.float()
            # zero the padding of shorter items, then pad everything to 30 s + half a window
            valid = torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]
            wav = torch.nn.functional.pad(wav * valid, (0, self.chunk_samples + self.n_fft - wav.shape[1]))
            stft = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, return_complex=True)
            power = stft[..., :self.n_frames].abs() ** 2
            log_spec = (self.filters @ power).clamp_min(1e-10).log10()
            log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
            x = ((log_spec + 4.0) / 4.0).transpose(1, 2)
            content = torch.arange(self.n_frames, device=x.device)[None, :] < (lengths // self.hop_length)[:, None]
            x = x * content[..., None]
        return x, self.frame_lengths(lengths)

    def forward(self, wav: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.log_mel(wav, lengths)

    has_stats = True


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al., 2019), applied only in training mode.

    Each utterance gets ``freq_masks`` bands of up to ``freq_width`` mel bins and
    ``time_masks`` spans of up to ``time_width_ratio`` of its length set to zero (the
    normalised mean). Vectorised over the batch: no Python loop per utterance.

    The masks are drawn from the module's own generator, not the global one, so that a
    resumed run can be given exactly the generator state it had when its checkpoint was
    written (:meth:`random_state`, :meth:`set_random_state`; saved by
    :class:`speechformer.lightning.SpeechModule`). It is created at the first training
    batch, on the features' device, seeded from ``torch.initial_seed()`` (the run's seed).
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
                 time_width_ratio: float = 0.05) -> None:
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width_ratio = time_masks, time_width_ratio
        self._generator: torch.Generator | None = None
        self._restored: dict | None = None  # a saved state, applied when the generator is made

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            saved, self._restored = self._restored, None
            if saved is not None and saved["device"] == device.type:
                self._generator.set_state(saved["state"])
            else:  # a fresh run (or a resume on another kind of device: see docs/reliability.md)
                self._generator.manual_seed(torch.initial_seed() ^ 0x5EC_A06)
        return self._generator

    def random_state(self) -> dict | None:
        """The mask generator's state as plain data (None before the first training batch)."""
        if self._generator is None:
            return self._restored
        return {"device": self._generator.device.type, "state": self._generator.get_state()}

    def set_random_state(self, state: dict | None) -> None:
        """Continue from :meth:`random_state`'s ``state`` at the next training batch."""
        self._generator, self._restored = None, state

    def _band_mask(self, n_masks: int, max_width: Tensor, size: int, batch: int, device: torch.device) -> Tensor:
        """[B, size] boolean, True inside any of ``n_masks`` random bands per row."""
        rng = self._rng(device)
        width = (torch.rand(batch, n_masks, device=device, generator=rng) * (max_width[:, None] + 1)).long()
        start = (torch.rand(batch, n_masks, device=device, generator=rng) * (size - width + 1).clamp_min(1)).long()
        pos = torch.arange(size, device=device)[None, None, :]
        inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
        return inside.any(dim=1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if not self.training:
            return x
        b, t, f = x.shape
        keep = torch.ones(b, t, f, dtype=torch.bool, device=x.device)
        if self.freq_masks > 0:
            widths = torch.full((b,), min(self.freq_width, f), device=x.device)
            keep &= ~self._band_mask(self.freq_masks, widths, f, b, x.device)[:, None, :]
        if self.time_masks > 0:
            widths = (lengths.to(x.device).float() * self.time_width_ratio).long()
            keep &= ~self._band_mask(self.time_masks, widths, t, b, x.device)[:, :, None]
        return x * keep

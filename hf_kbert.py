"""KBERT in Hugging Face transformers: what the auto classes load from an export folder or Hub
repo with trust_remote_code=True.

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
    logits = model(**tok(["The capital of France is [MASK]."], return_tensors="pt")).logits

An export holds this file next to a verbatim copy of model.py and every class here runs
model.py's KBERT and heads: there is no second copy of the model. What is added is only what
transformers expects: a config class, attention_mask, output classes, losses from labels.
Every class keeps the encoder under `kbert` (the base_model_prefix) and a task head under
`head`, so one model.safetensors loads in each of them, and in trainer.load_encoder
(common.save_pretrained writes it).
"""
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutput, MaskedLMOutput, QuestionAnsweringModelOutput,
                                           SequenceClassifierOutput)

try:  # in an export, as transformers imports it: the model.py copied beside this file
    from .model import BLOCK, KBERT, N_TARGETS, PAD_ID, ClassificationHead, ModelConfig, Rotary, SpanHead
except ImportError:  # in the repo (no package): model.py itself
    from model import BLOCK, KBERT, N_TARGETS, PAD_ID, ClassificationHead, ModelConfig, Rotary, SpanHead

MODEL_FIELDS = tuple(ModelConfig().to_dict())  # the architecture's fields, flat in config.json


class KBertConfig(PretrainedConfig):
    """model.py's ModelConfig fields (validated by it, the preset filled in) plus transformers'
    own (id2label, problem_type, ...). Defaults are ModelConfig's, so a config.json that leaves
    a field out means the same model here and in the repo's loaders."""

    model_type = "kbert"
    # the generic names other libraries read (sentence-transformers reads hidden_size)
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "intermediate_size": "d_mlp"}

    def __init__(self, pad_token_id: int = PAD_ID, **kwargs):
        model = ModelConfig(**{k: kwargs.pop(k) for k in MODEL_FIELDS if k in kwargs})
        for k, v in model.to_dict().items():
            setattr(self, k, v)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{k: getattr(self, k) for k in MODEL_FIELDS})


class KBertPreTrainedModel(PreTrainedModel):
    config_class = KBertConfig
    base_model_prefix = "kbert"
    _keys_to_ignore_on_load_unexpected = [r"^head\."]  # a finetuned export loads in AutoModel without warnings

    def __init__(self, config: KBertConfig):
        super().__init__(config)
        self.kbert = KBERT(config.model_config())  # attn_backend "auto": FlexAttention on CUDA, SDPA on CPU

    def get_input_embeddings(self):
        return self.kbert.embed

    def set_input_embeddings(self, value):
        self.kbert.embed = value

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers builds the model on the meta device, loads the checkpoint and calls this
        for the modules it did not fill (which ones varies across 5.x; loaded tensors carry its
        _is_hf_initialized flag): recompute the rotary frequencies (a buffer, never saved) and
        initialise what is missing as model.py's constructors do (a new task head)."""
        if isinstance(module, Rotary):
            with torch.device("cpu"):
                module.freqs.copy_(Rotary(self.kbert.cfg.head_dim, self.kbert.cfg.rope_base).freqs)
            return
        if any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
            return
        head = getattr(self, "head", None)
        if module is self.kbert:
            module.init_weights()
        elif head is not None and module is getattr(head, "dense", None):
            module.reset_parameters()
        elif head is not None and module is head.out:
            module.weight.zero_()
            module.bias.zero_()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> hidden states (B, T, D).
        KBERT has no attention mask argument: a run of [PAD] is a document of its own, which no
        real token attends to (model.document_ids). So positions with attention_mask 0 become
        [PAD] and each row's real tokens move to its front (padding on either side, or holes):
        they then sit where they would unpadded, and the outputs move back to the input's order."""
        order = None
        if attention_mask is not None and not attention_mask.all():
            keep = attention_mask.bool()
            order = torch.sort((~keep).int(), dim=1, stable=True).indices  # real tokens first, in order
            input_ids = input_ids.masked_fill(~keep, PAD_ID).gather(1, order)
        T = input_ids.size(1)
        backend = self.kbert.attn_backend
        if (backend == "flex" or (backend == "auto" and input_ids.is_cuda)) and T % BLOCK:
            input_ids = F.pad(input_ids, (0, BLOCK - T % BLOCK), value=PAD_ID)  # FlexAttention takes whole blocks
        h = self.kbert(input_ids)[:, :T]
        if order is not None:
            h = torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)
        return h

    @staticmethod
    def first_real(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) -> (B, D) at each row's first real token: the [CLS] the finetuner reads."""
        if attention_mask is None:
            return h[:, 0]
        return h[torch.arange(h.size(0), device=h.device), attention_mask.int().argmax(1)]


# Each forward takes what the tokenizer returns plus the labels of its task. The other keyword
# arguments generic callers pass (return_dict, output_hidden_states, ...) are accepted and
# ignored: the outputs are always the ModelOutput below.


class KBertModel(KBertPreTrainedModel):
    def __init__(self, config: KBertConfig):
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.encode(input_ids, attention_mask))


class KBertForMaskedLM(KBertPreTrainedModel):
    """The MLM head is the token embedding (tied) with model.py's soft cap: no weights of its own."""

    def __init__(self, config: KBertConfig):
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs) -> MaskedLMOutput:
        h = self.encode(input_ids, attention_mask)
        if labels is not None and (labels >= N_TARGETS).any():
            raise ValueError(f"labels must be -100 (not predicted) or an ordinary token id below {N_TARGETS}: [CLS], "
                             "[MASK], [SEP], [PAD] and the padded vocabulary rows are never MLM targets")
        loss = None if labels is None else self.kbert.mlm_loss(h, labels)[0]  # labels < 0 (-100) are ignored
        return MaskedLMOutput(loss=loss, logits=self.kbert.mlm_logits(h))


class KBertForSequenceClassification(KBertPreTrainedModel):
    """num_labels == 1 is regression (STS-B), with a mean-squared-error loss."""

    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: KBertConfig):
        super().__init__(config)
        self.head = ClassificationHead(config.d_model, config.num_labels, config.dropout)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        logits = self.head(self.first_real(self.encode(input_ids, attention_mask), attention_mask))
        loss = None if labels is None else self.head.loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class KBertForQuestionAnswering(KBertPreTrainedModel):
    """Start and end logits per token; inputs `[CLS] question [SEP] context [SEP]`."""

    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: KBertConfig):
        super().__init__(config)
        self.head = SpanHead(config.d_model)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, start_positions=None, end_positions=None,
                **kwargs) -> QuestionAnsweringModelOutput:
        start, end = self.head(self.encode(input_ids, attention_mask))
        loss = None
        if start_positions is not None and end_positions is not None:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            loss = SpanHead.loss(start, end, start_positions, end_positions, valid)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)

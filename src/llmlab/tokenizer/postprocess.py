"""Post-processors: add special tokens around encoded sequences and assign token-type ids, e.g. BERT's
"[CLS] A [SEP] B [SEP]" (B's part has type 1) or Llama's "<s> A". One class per tokenizer.json "type".

Each is called as post_processor(a, b, add_special_tokens=True) -> (ids, type_ids). add_special_tokens=False adds
no tokens but still types the sequences, as `tokenizers` does (a template's "$B:0" keeps B at type 0; RoBERTa's
are all 0)."""


class TemplateProcessing:
    """single / pair are lists of ("seq", "A"|"B", type_id) and ("special", name, type_id); specials maps a
    name to the ids it stands for (usually one)."""

    def __init__(self, single: list, pair: list, specials: dict[str, list[int]]):
        for kind, name, _ in single + pair:
            if kind == "seq" and name not in ("A", "B"):
                raise ValueError(f"template sequence id must be 'A' or 'B', got {name!r}")
            if kind == "special" and name not in specials:
                raise ValueError(f"template special token {name!r} has no ids in special_tokens")
        self.single, self.pair, self.specials = single, pair, specials

    @classmethod
    def bert(cls, cls_token: tuple[str, int], sep_token: tuple[str, int]) -> "TemplateProcessing":
        """BERT's "[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]", with B and its [SEP] in type 1."""
        single = [("special", cls_token[0], 0), ("seq", "A", 0), ("special", sep_token[0], 0)]
        pair = single + [("seq", "B", 1), ("special", sep_token[0], 1)]
        return cls(single, pair, {cls_token[0]: [cls_token[1]], sep_token[0]: [sep_token[1]]})

    def __call__(self, a: list[int], b: list[int] | None,
                 add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        seqs = {"A": a, "B": b}
        ids: list[int] = []
        types: list[int] = []
        for kind, name, type_id in (self.single if b is None else self.pair):
            if kind == "special" and not add_special_tokens:
                continue
            piece = seqs[name] if kind == "seq" else self.specials[name]
            ids += piece
            types += [type_id] * len(piece)
        return ids, types

    def to_hf(self) -> dict:
        def items(template):
            return [{"SpecialToken" if kind == "special" else "Sequence": {"id": name, "type_id": t}}
                    for kind, name, t in template]

        return {"type": "TemplateProcessing", "single": items(self.single), "pair": items(self.pair),
                "special_tokens": {k: {"id": k, "ids": v, "tokens": [k] * len(v)}
                                   for k, v in sorted(self.specials.items())}}


class RobertaProcessing:
    """RoBERTa's "<s> A </s>" and "<s> A </s></s> B </s>"; every type id is 0."""

    def __init__(self, sep: tuple[str, int], cls: tuple[str, int], trim_offsets: bool = True,
                 add_prefix_space: bool = True):
        self.sep, self.cls, self.trim_offsets, self.add_prefix_space = sep, cls, trim_offsets, add_prefix_space

    def __call__(self, a: list[int], b: list[int] | None,
                 add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        if not add_special_tokens:
            ids = a + (b or [])
            return ids, [0] * len(ids)
        ids = [self.cls[1], *a, self.sep[1]]
        if b is not None:
            ids += [self.sep[1], *b, self.sep[1]]
        return ids, [0] * len(ids)

    def to_hf(self) -> dict:
        return {"type": "RobertaProcessing", "sep": list(self.sep), "cls": list(self.cls),
                "trim_offsets": self.trim_offsets, "add_prefix_space": self.add_prefix_space}


class ByteLevelProcessing:
    """Only trims offsets in `tokenizers`; ids pass through unchanged."""

    def __call__(self, a: list[int], b: list[int] | None,
                 add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        return a + (b or []), [0] * len(a) + [1] * len(b or [])

    def to_hf(self) -> dict:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


class PostProcessorSequence:
    """Applies the one processor that adds tokens; ByteLevel members (offset trimming only) pass through."""

    def __init__(self, processors: list):
        self.processors = list(processors)
        adders = [p for p in self.processors if not isinstance(p, ByteLevelProcessing)]
        if len(adders) > 1:
            raise ValueError("a post-processor Sequence with more than one token-adding processor is not supported")
        self._adder = adders[0] if adders else ByteLevelProcessing()

    def __call__(self, a: list[int], b: list[int] | None,
                 add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        return self._adder(a, b, add_special_tokens)

    def to_hf(self) -> dict:
        return {"type": "Sequence", "processors": [p.to_hf() for p in self.processors]}


def _pair(value, where: str) -> tuple[str, int]:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        return value[0], value[1]
    raise ValueError(f"{where} must be [token, id], got {value!r}")


def _template_from_hf(d: dict) -> TemplateProcessing:
    specials = {}
    for name, spec in (d.get("special_tokens") or {}).items():
        ids = spec.get("ids") if isinstance(spec, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"TemplateProcessing special token {name!r} needs an 'ids' list of ints")
        specials[name] = ids
    templates = []
    for key in ("single", "pair"):
        items = d.get(key)
        if not isinstance(items, list):
            raise ValueError(f"malformed TemplateProcessing: {key!r} must be a list")
        template = []
        for item in items:
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"malformed template item {item!r}")
            (tag, body), = item.items()
            if tag not in ("Sequence", "SpecialToken") or not isinstance(body, dict) or "id" not in body:
                raise ValueError(f"malformed template item {item!r}: expected Sequence or SpecialToken with an id")
            template.append(("seq" if tag == "Sequence" else "special", body["id"], body.get("type_id", 0)))
        templates.append(template)
    return TemplateProcessing(templates[0], templates[1], specials)


def post_processor_from_hf(d: dict | None):
    """A tokenizer.json "post_processor" object -> a post-processor (None stays None)."""
    if d is None:
        return None
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "TemplateProcessing":
        return _template_from_hf(d)
    if kind == "BertProcessing":
        return TemplateProcessing.bert(_pair(d.get("cls"), "BertProcessing.cls"), _pair(d.get("sep"), "BertProcessing.sep"))
    if kind == "RobertaProcessing":
        return RobertaProcessing(_pair(d.get("sep"), "RobertaProcessing.sep"), _pair(d.get("cls"), "RobertaProcessing.cls"),
                                 bool(d.get("trim_offsets", True)), bool(d.get("add_prefix_space", True)))
    if kind == "ByteLevel":
        return ByteLevelProcessing()
    if kind == "Sequence":
        items = d.get("processors")
        if not isinstance(items, list):
            raise ValueError(f"Sequence post-processor needs a 'processors' list, got {items!r}")
        return PostProcessorSequence([post_processor_from_hf(p) for p in items])
    raise ValueError(f"unsupported post_processor {kind!r}; supported: TemplateProcessing, BertProcessing, "
                     "RobertaProcessing, ByteLevel, Sequence")

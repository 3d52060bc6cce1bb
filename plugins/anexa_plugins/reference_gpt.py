"""A GPT-2-style language model in plain Python: lists of floats, the ``math`` module, nothing else.

No torch, no numpy, no automatic differentiation. Every operation the model performs has two
functions here: a *forward* that computes its output and keeps what its derivative will need (the
"tape"), and a *backward* that turns the gradient of the loss with respect to its output into the
gradients with respect to its inputs and weights, by the chain rule. Read it top to bottom:

1. lists as vectors and matrices
2. the layers: linear, LayerNorm, GELU, causal multi-head self-attention
3. one transformer block, and the stack of blocks with learned positions
4. the whole model: token embedding → stack → tied head → cross-entropy, and its backward
5. optimizer steps: SGD and Adam(W)
6. a demo: ``python plugins/anexa_plugins/reference_gpt.py`` trains a tiny model on a paragraph and prints the loss

It computes exactly what the ``gpt2`` blocks plugin computes with PyTorch (pre-LayerNorm blocks, GELU
MLP, learned positions, final LayerNorm; Radford et al. 2019), and the tests hold it to that: with the
same weights, the loss and every parameter's gradient agree within 1e-9 (``tests/test_reference.py``).
The ``reference`` blocks plugin (``plugins/anexa_plugins/reference_blocks.py``) runs these functions inside ``anexa
train``, so you can watch this file learn (slowly).

Conventions
-----------
- A **vector** is a ``list[float]``; a **matrix** is a list of rows, ``m[i][j]`` row ``i`` column ``j``.
- Activations are matrices of **rows**, one row per token: ``N = batch · T`` rows of ``C`` numbers,
  sequence ``b``'s tokens being rows ``b·T … b·T + T − 1``.
- A linear layer's weight is ``out × in`` (PyTorch's ``nn.Linear`` layout): ``y = x · Wᵀ + b``.
- Parameters live in a ``dict`` from name to vector or matrix, under the names PyTorch gives the
  ``gpt2`` blocks (``wte.weight``, ``blocks.layers.0.attn.qkv.weight``, …), so weights copy across.
- Floats are Python floats: IEEE double precision (float64).
"""

import math
import random

LAYER_NORM_EPS = 1e-5  # PyTorch's nn.LayerNorm default, which the gpt2 blocks use


# --- 1. Lists as vectors and matrices ---------------------------------------------------------------


def dot(a, b):
    """Σᵢ aᵢ·bᵢ of two vectors of the same length."""
    return sum(x * y for x, y in zip(a, b, strict=True))


def transpose(m):
    """The ``cols × rows`` matrix whose row ``j`` is column ``j`` of ``m``."""
    return [list(column) for column in zip(*m, strict=True)]


def matmul_t(a, b):
    """``a · bᵀ``: ``a`` is ``N × K``, ``b`` is ``M × K``; the result is ``N × M`` with entry
    ``[n][m] = dot(a[n], b[m])``. Taking the second factor by its rows keeps every inner loop a dot
    product of two rows, which is the fastest thing plain Python does."""
    return [[dot(row, other) for other in b] for row in a]


def add(a, b):
    """Elementwise sum of two matrices of the same shape."""
    return [[x + y for x, y in zip(row_a, row_b, strict=True)] for row_a, row_b in zip(a, b, strict=True)]


def column_sums(m):
    """The vector of the sums of each column of ``m``."""
    return [sum(column) for column in zip(*m, strict=True)]


def zeros(rows, cols):
    return [[0.0] * cols for _ in range(rows)]


# --- 2. The layers ----------------------------------------------------------------------------------


def linear_forward(x, weight, bias):
    """``y = x · Wᵀ + b``: ``x`` N × in, ``weight`` out × in, ``bias`` out → ``y`` N × out."""
    return [[value + b for value, b in zip(row, bias, strict=True)] for row in matmul_t(x, weight)]


def linear_backward(dy, x, weight):
    """Gradients of ``linear_forward`` given ``dy`` (N × out), the gradient of the loss w.r.t. ``y``.

    ``y[n][o] = Σᵢ x[n][i]·W[o][i] + b[o]``, so
    ``dx[n][i] = Σₒ dy[n][o]·W[o][i]`` (dy · W), ``dW[o][i] = Σₙ dy[n][o]·x[n][i]`` (dyᵀ · x) and
    ``db[o] = Σₙ dy[n][o]``. Returns ``(dx, dweight, dbias)``.
    """
    dy_t = transpose(dy)
    dx = matmul_t(dy, transpose(weight))
    dweight = matmul_t(dy_t, transpose(x))
    dbias = [sum(row) for row in dy_t]
    return dx, dweight, dbias


def layer_norm_forward(x, weight, bias, eps=LAYER_NORM_EPS):
    """Per row: ``x̂ = (x − mean) / sqrt(var + eps)``, ``y = x̂·w + b`` (Ba et al. 2016); the variance is
    the biased one (divide by C), as PyTorch's. Returns ``(y, tape)``; the tape holds ``x̂`` and
    ``1 / sqrt(var + eps)`` of every row."""
    y, x_hats, inv_stds = [], [], []
    for row in x:
        mean = sum(row) / len(row)
        variance = sum((value - mean) ** 2 for value in row) / len(row)
        inv_std = 1.0 / math.sqrt(variance + eps)
        x_hat = [(value - mean) * inv_std for value in row]
        y.append([h * w + b for h, w, b in zip(x_hat, weight, bias, strict=True)])
        x_hats.append(x_hat)
        inv_stds.append(inv_std)
    return y, (x_hats, inv_stds)


def layer_norm_backward(dy, tape, weight):
    """Gradients of ``layer_norm_forward``. With ``g = dy·w`` (the gradient w.r.t. ``x̂``), differentiating
    the mean and the variance too gives, per row,
    ``dx = (g − mean(g) − x̂·mean(g·x̂)) / sqrt(var + eps)``; ``dw = Σ dy·x̂`` and ``db = Σ dy`` over rows.
    Returns ``(dx, dweight, dbias)``."""
    x_hats, inv_stds = tape
    dx = []
    dweight, dbias = [0.0] * len(weight), [0.0] * len(weight)
    for dy_row, x_hat, inv_std in zip(dy, x_hats, inv_stds, strict=True):
        g = [d * w for d, w in zip(dy_row, weight, strict=True)]
        mean_g = sum(g) / len(g)
        mean_gx = dot(g, x_hat) / len(g)
        dx.append([(gi - mean_g - h * mean_gx) * inv_std for gi, h in zip(g, x_hat, strict=True)])
        for i, (d, h) in enumerate(zip(dy_row, x_hat, strict=True)):
            dweight[i] += d * h
            dbias[i] += d
    return dx, dweight, dbias


def gelu(value):
    """GELU, exact form (Hendrycks & Gimpel 2016): ``x·Φ(x)`` with Φ the standard normal CDF."""
    return 0.5 * value * (1.0 + math.erf(value / math.sqrt(2.0)))


def gelu_forward(x):
    return [[gelu(value) for value in row] for row in x]


def gelu_backward(dy, x):
    """``d/dx [x·Φ(x)] = Φ(x) + x·φ(x)``, φ the standard normal density ``exp(−x²/2)/sqrt(2π)``."""

    def slope(value):
        cdf = 0.5 * (1.0 + math.erf(value / math.sqrt(2.0)))
        density = math.exp(-0.5 * value * value) / math.sqrt(2.0 * math.pi)
        return cdf + value * density

    return [[d * slope(value) for d, value in zip(dy_row, row, strict=True)] for dy_row, row in zip(dy, x, strict=True)]


def softmax(scores):
    """``exp(sᵢ − max) / Σⱼ exp(sⱼ − max)``: subtracting the maximum changes nothing but keeps exp finite."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def attention_forward(qkv, batch, n_head, remember=None, layer=0):
    """Causal multi-head self-attention (Vaswani et al. 2017) on the rows of ``qkv`` (N × 3C): each row
    holds a token's query, key and value, each C = n_head · D numbers, head ``h`` owning columns
    ``h·D … h·D + D − 1`` of each. Per sequence and head, token ``t`` attends to keys ``s ≤ t``:

        p[t][s] = softmax over s of (q[t] · k[s] / sqrt(D)),    out[t] = Σₛ p[t][s] · v[s]

    ``remember(layer, k, v) → (k, v)`` (optional) is a KV cache: it gets this forward's keys and values
    as ``k[b][h][t]`` vectors and returns every key and value stored so far; the T queries are then the
    *last* T positions, so query ``t`` sees keys ``s ≤ t + Tk − T``. Returns ``(out, tape)``, ``out``
    N × C with the heads side by side again. A forward with ``remember`` cannot be differentiated.
    """
    rows, width = len(qkv), len(qkv[0]) // 3
    t_q, d = rows // batch, width // n_head

    def heads(offset):  # [b][h][t] → the D numbers of head h of token t of sequence b
        return [
            [[qkv[b * t_q + t][offset + h * d : offset + (h + 1) * d] for t in range(t_q)] for h in range(n_head)]
            for b in range(batch)
        ]

    q, k, v = heads(0), heads(width), heads(2 * width)
    if remember is not None:
        k, v = remember(layer, k, v)
    scale = 1.0 / math.sqrt(d)
    out = zeros(rows, width)
    probs = [[[] for _ in range(n_head)] for _ in range(batch)]
    for b in range(batch):
        for h in range(n_head):
            keys, values = k[b][h], v[b][h]
            for t in range(t_q):
                visible = len(keys) - t_q + t + 1  # bottom-right causal mask
                p = softmax([dot(q[b][h][t], keys[s]) * scale for s in range(visible)])
                probs[b][h].append(p)
                mixed = [sum(p[s] * values[s][i] for s in range(visible)) for i in range(d)]
                out[b * t_q + t][h * d : (h + 1) * d] = mixed
    return out, (q, k, v, probs, scale)


def attention_backward(dout, tape):
    """Gradients of ``attention_forward`` (without a cache) w.r.t. its ``qkv`` rows.

    For one query row: ``dv[s] += p[s]·dout``; ``dp[s] = dout · v[s]``; through the softmax,
    ``ds[s] = p[s]·(dp[s] − Σᵣ p[r]·dp[r])``; and through the scaled dot products
    ``dq += Σₛ ds[s]·k[s] / sqrt(D)``, ``dk[s] += ds[s]·q / sqrt(D)``.
    """
    q, k, v, probs, scale = tape
    batch, n_head, t_q, d = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    width = n_head * d
    dqkv = zeros(batch * t_q, 3 * width)
    for b in range(batch):
        for h in range(n_head):
            dk = [[0.0] * d for _ in range(t_q)]
            dv = [[0.0] * d for _ in range(t_q)]
            for t in range(t_q):
                p = probs[b][h][t]
                grad_out = dout[b * t_q + t][h * d : (h + 1) * d]
                dp = [dot(grad_out, v[b][h][s]) for s in range(len(p))]
                weighted = dot(p, dp)
                ds = [p_s * (dp_s - weighted) for p_s, dp_s in zip(p, dp, strict=True)]
                dq = [0.0] * d
                for s, (p_s, ds_s) in enumerate(zip(p, ds, strict=True)):
                    for i in range(d):
                        dv[s][i] += p_s * grad_out[i]
                        dq[i] += ds_s * k[b][h][s][i] * scale
                        dk[s][i] += ds_s * q[b][h][t][i] * scale
                dqkv[b * t_q + t][h * d : (h + 1) * d] = dq
            for t in range(t_q):
                dqkv[b * t_q + t][width + h * d : width + (h + 1) * d] = dk[t]
                dqkv[b * t_q + t][2 * width + h * d : 2 * width + (h + 1) * d] = dv[t]
    return dqkv


# --- 3. A transformer block, and the stack ----------------------------------------------------------


def block_forward(x, params, layer, n_head, batch, remember=None):
    """One pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(·))`` with
    ``mlp(h) = proj(gelu(fc(h)))``, fc widening C to 4C. ``params`` use the stack's names
    (``layers.{layer}.attn.qkv.weight`` …). Returns ``(y, tape)``."""

    def p(name):
        return params[f"layers.{layer}.{name}"]

    h1, ln_1 = layer_norm_forward(x, p("ln_1.weight"), p("ln_1.bias"))
    qkv = linear_forward(h1, p("attn.qkv.weight"), p("attn.qkv.bias"))
    mixed, attn = attention_forward(qkv, batch, n_head, remember, layer)
    x = add(x, linear_forward(mixed, p("attn.proj.weight"), p("attn.proj.bias")))
    h2, ln_2 = layer_norm_forward(x, p("ln_2.weight"), p("ln_2.bias"))
    wide = linear_forward(h2, p("mlp.fc.weight"), p("mlp.fc.bias"))
    activated = gelu_forward(wide)
    y = add(x, linear_forward(activated, p("mlp.proj.weight"), p("mlp.proj.bias")))
    return y, dict(h1=h1, ln_1=ln_1, attn=attn, mixed=mixed, h2=h2, ln_2=ln_2, wide=wide, activated=activated)


def block_backward(dy, tape, params, layer, grads):
    """Gradients of ``block_forward``: returns ``dx`` and adds the weights' gradients into ``grads``.

    A residual connection ``y = x + f(x)`` passes ``dy`` through unchanged *and* into ``f``'s backward;
    the two gradients for ``x`` add up."""

    def p(name):
        return params[f"layers.{layer}.{name}"]

    def keep(name, dweight, dbias):
        grads[f"layers.{layer}.{name}.weight"], grads[f"layers.{layer}.{name}.bias"] = dweight, dbias

    # The MLP branch, last operation first: proj, GELU, fc, then ln_2.
    d_activated, dw, db = linear_backward(dy, tape["activated"], p("mlp.proj.weight"))
    keep("mlp.proj", dw, db)
    d_wide = gelu_backward(d_activated, tape["wide"])
    d_h2, dw, db = linear_backward(d_wide, tape["h2"], p("mlp.fc.weight"))
    keep("mlp.fc", dw, db)
    d_x, dw, db = layer_norm_backward(d_h2, tape["ln_2"], p("ln_2.weight"))
    keep("ln_2", dw, db)
    dx = add(dy, d_x)  # the residual path plus the MLP's path
    # The attention branch: proj, attention itself, qkv, then ln_1.
    d_mixed, dw, db = linear_backward(dx, tape["mixed"], p("attn.proj.weight"))
    keep("attn.proj", dw, db)
    d_qkv = attention_backward(d_mixed, tape["attn"])
    d_h1, dw, db = linear_backward(d_qkv, tape["h1"], p("attn.qkv.weight"))
    keep("attn.qkv", dw, db)
    d_x, dw, db = layer_norm_backward(d_h1, tape["ln_1"], p("ln_1.weight"))
    keep("ln_1", dw, db)
    return add(dx, d_x)


def count_layers(params):
    """The number of blocks, read from the parameter names."""
    return sum(1 for name in params if name.startswith("layers.") and name.endswith(".ln_1.weight"))


def stack_forward(params, n_head, x, batch, positions, remember=None):
    """The block stack: add the learned position vectors, run every block, apply the final LayerNorm.

    ``params``: the stack's parameters (``wpe.weight``, ``layers.*``, ``ln_f.*``); ``x``: N × C token
    embeddings, N = batch · T; ``positions``: the T absolute positions (0-based) of each sequence's
    tokens. Returns ``(hidden, tape)``, ``hidden`` N × C. Raises ``ValueError`` for a position beyond
    the learned ones (``block_size``).
    """
    wpe = params["wpe.weight"]
    if max(positions) >= len(wpe):
        raise ValueError(f"position {max(positions)} is beyond block_size {len(wpe)}")
    t_q = len(positions)
    h = [[value + pos for value, pos in zip(row, wpe[positions[n % t_q]], strict=True)] for n, row in enumerate(x)]
    tapes = []
    for layer in range(count_layers(params)):
        h, tape = block_forward(h, params, layer, n_head, batch, remember)
        tapes.append(tape)
    hidden, ln_f = layer_norm_forward(h, params["ln_f.weight"], params["ln_f.bias"])
    return hidden, dict(blocks=tapes, ln_f=ln_f, positions=list(positions), n_wpe=len(wpe), width=len(x[0]))


def stack_backward(d_hidden, tape, params):
    """Gradients of ``stack_forward``: ``(dx, grads)``, ``dx`` N × C for the token embeddings and
    ``grads`` a dict under the stack's parameter names."""
    grads = {}
    dh, grads["ln_f.weight"], grads["ln_f.bias"] = layer_norm_backward(d_hidden, tape["ln_f"], params["ln_f.weight"])
    for layer in reversed(range(len(tape["blocks"]))):
        dh = block_backward(dh, tape["blocks"][layer], params, layer, grads)
    positions = tape["positions"]
    d_wpe = zeros(tape["n_wpe"], tape["width"])
    for n, row in enumerate(dh):  # a position vector was added to every sequence's token at that position
        target = d_wpe[positions[n % len(positions)]]
        for i, value in enumerate(row):
            target[i] += value
    grads["wpe.weight"] = d_wpe
    return dh, grads


# --- 4. The whole model -----------------------------------------------------------------------------


def stack_params(params):
    """The ``blocks.*`` entries of a model's parameters, under the stack's own names."""
    return {name[len("blocks.") :]: value for name, value in params.items() if name.startswith("blocks.")}


def head_name(params):
    """``lm_head.weight`` for an untied head; else the head *is* the token embedding (weight tying,
    Press & Wolf 2017): one V × C matrix turns ids into vectors and vectors into scores."""
    return "lm_head.weight" if "lm_head.weight" in params else "wte.weight"


def forward(params, n_head, ids, positions=None):
    """Logits (N × V) for token ids ``ids`` (``batch`` lists of T ints), and the tape for ``backward``."""
    batch, t_q = len(ids), len(ids[0])
    wte = params["wte.weight"]
    x = [list(wte[token]) for sequence in ids for token in sequence]  # embedding: a row lookup
    positions = list(range(t_q)) if positions is None else positions
    hidden, stack_tape = stack_forward(stack_params(params), n_head, x, batch, positions)
    logits = matmul_t(hidden, params[head_name(params)])  # score of token v: dot(hidden, head[v])
    return logits, dict(stack=stack_tape, hidden=hidden, ids=[token for sequence in ids for token in sequence])


def cross_entropy(logits, targets):
    """Mean over rows of ``−log softmax(logits)[target]`` (nats per token), and its gradient
    ``(softmax(logits) − onehot(target)) / N`` w.r.t. the logits."""
    n = len(logits)
    loss, d_logits = 0.0, []
    for row, target in zip(logits, targets, strict=True):
        p = softmax(row)
        loss -= math.log(p[target])
        p[target] -= 1.0
        d_logits.append([value / n for value in p])
    return loss / n, d_logits


def backward(d_logits, tape, params):
    """Gradients of every parameter given ``d_logits`` (N × V): a dict with the keys of ``params``."""
    head = head_name(params)
    d_hidden = matmul_t(d_logits, transpose(params[head]))
    d_head = matmul_t(transpose(d_logits), transpose(tape["hidden"]))
    dx, stack_grads = stack_backward(d_hidden, tape["stack"], stack_params(params))
    grads = {f"blocks.{name}": value for name, value in stack_grads.items()}
    d_wte = zeros(len(params["wte.weight"]), len(params["wte.weight"][0]))
    for token, row in zip(tape["ids"], dx, strict=True):  # the lookup's gradient: each used row collects its tokens'
        for i, value in enumerate(row):
            d_wte[token][i] += value
    if head == "wte.weight":  # tied: the matrix gets the gradient of both of its uses
        d_wte = add(d_wte, d_head)
    else:
        grads[head] = d_head
    grads["wte.weight"] = d_wte
    return grads


def loss_and_gradients(params, n_head, ids, targets):
    """The mean cross-entropy of predicting ``targets`` (same shape as ``ids``) and every parameter's
    gradient: one forward and one backward pass."""
    logits, tape = forward(params, n_head, ids)
    loss, d_logits = cross_entropy(logits, [token for sequence in targets for token in sequence])
    return loss, backward(d_logits, tape, params)


# --- 5. Optimizer steps -----------------------------------------------------------------------------


def _rows(value):
    """A parameter as a list of rows (a vector is one row), so one loop updates either kind in place."""
    return value if value and isinstance(value[0], list) else [value]


def sgd_step(params, grads, lr):
    """Stochastic gradient descent: ``p ← p − lr·g`` for every number of every parameter, in place."""
    for name, value in params.items():
        for row, grad_row in zip(_rows(value), _rows(grads[name]), strict=True):
            for i, g in enumerate(grad_row):
                row[i] -= lr * g


def adam_step(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One Adam step (Kingma & Ba 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter 2019),
    in place. ``state`` starts as ``{}`` and keeps the step count and both moments between calls.

    Per number: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²`` (running mean of gradients and of their
    squares), bias-corrected ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``, then
    ``p ← p·(1 − lr·weight_decay) − lr·m̂/(sqrt(v̂) + eps)``.
    """
    step = state["step"] = state.get("step", 0) + 1
    correction1, correction2 = 1.0 - beta1**step, 1.0 - beta2**step
    for name, value in params.items():
        if name not in state:
            state[name] = ([[0.0] * len(row) for row in _rows(value)], [[0.0] * len(row) for row in _rows(value)])
        first, second = state[name]
        for row, grad_row, m_row, v_row in zip(_rows(value), _rows(grads[name]), first, second, strict=True):
            for i, g in enumerate(grad_row):
                m_row[i] = beta1 * m_row[i] + (1.0 - beta1) * g
                v_row[i] = beta2 * v_row[i] + (1.0 - beta2) * g * g
                m_hat, v_hat = m_row[i] / correction1, v_row[i] / correction2
                row[i] = row[i] * (1.0 - lr * weight_decay) - lr * m_hat / (math.sqrt(v_hat) + eps)


# --- 6. A demo --------------------------------------------------------------------------------------


def init_params(vocab_size, n_layer, n_embd, block_size, seed=0):
    """GPT-2's initialisation: weights ~ N(0, 0.02²), the residual projections' ~ N(0, (0.02/sqrt(2L))²)
    so the residual stream's variance does not grow with depth, biases 0, LayerNorm gains 1."""
    rng = random.Random(seed)

    def normal(rows, cols, std=0.02):
        return [[rng.gauss(0.0, std) for _ in range(cols)] for _ in range(rows)]

    c, residual_std = n_embd, 0.02 / math.sqrt(2 * n_layer)
    params = {"wte.weight": normal(vocab_size, c), "blocks.wpe.weight": normal(block_size, c)}
    for layer in range(n_layer):
        prefix = f"blocks.layers.{layer}."
        params.update(
            {
                prefix + "ln_1.weight": [1.0] * c,
                prefix + "ln_1.bias": [0.0] * c,
                prefix + "attn.qkv.weight": normal(3 * c, c),
                prefix + "attn.qkv.bias": [0.0] * (3 * c),
                prefix + "attn.proj.weight": normal(c, c, residual_std),
                prefix + "attn.proj.bias": [0.0] * c,
                prefix + "ln_2.weight": [1.0] * c,
                prefix + "ln_2.bias": [0.0] * c,
                prefix + "mlp.fc.weight": normal(4 * c, c),
                prefix + "mlp.fc.bias": [0.0] * (4 * c),
                prefix + "mlp.proj.weight": normal(c, 4 * c, residual_std),
                prefix + "mlp.proj.bias": [0.0] * c,
            }
        )
    params["blocks.ln_f.weight"], params["blocks.ln_f.bias"] = [1.0] * c, [0.0] * c
    return params


def count_parameters(params):
    return sum(len(row) for value in params.values() for row in _rows(value))


def _demo(steps=60, n_layer=1, n_head=2, n_embd=16, block_size=16, batch=4):
    text = (
        "A language model reads a window of characters and guesses the next one. It starts out "
        "guessing at random; each step nudges every weight a little against its gradient, and the "
        "guesses get better. Watch the loss fall.\n"
    )
    chars = sorted(set(text))
    ids = [chars.index(char) for char in text]
    params = init_params(len(chars), n_layer, n_embd, block_size)
    rng = random.Random(1)
    print(
        f"{count_parameters(params)} parameters, {len(chars)} characters; the loss starts near "
        f"ln({len(chars)}) = {math.log(len(chars)):.2f}"
    )
    state = {}
    for step in range(1, steps + 1):
        starts = [rng.randrange(len(ids) - block_size) for _ in range(batch)]
        x = [ids[s : s + block_size] for s in starts]
        y = [ids[s + 1 : s + block_size + 1] for s in starts]
        loss, grads = loss_and_gradients(params, n_head, x, y)
        adam_step(params, grads, state, lr=1e-2)
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss:.3f}")
    context = ids[:8]
    for _ in range(40):  # greedy decoding: recompute the window, take the most likely next character
        window = context[-block_size:]
        logits, _ = forward(params, n_head, [window])
        last = logits[-1]
        context.append(last.index(max(last)))
    print("greedy continuation:", repr("".join(chars[i] for i in context)))


if __name__ == "__main__":
    _demo()

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The two posts, derived live
#
# Every claim of `docs/background.md` ("What the formulas imply"), derived by gradlab from the one
# definition of the two-coefficient loss `gdpo`, shown as LaTeX and checked numerically in
# high precision against the hand formula. The last row is the first post's proper loss: the
# derivative of its integrand pi(y) pi(y') l carries the score-function term, and its exact
# gradient over a toy policy agrees with JAX autodiff.
#
# Static rendering: the force that grows with length is in
# [`figures/force_vs_length.png`](../figures/force_vs_length.png).

# %%
import gradlab
from gradlab import explore
from IPython.display import Markdown, display

explore.setup()  # float64 in JAX: the one setup call a notebook makes

display(Markdown(f"$$\\ell_{{gdpo}} = {gradlab.latex(gradlab.get_loss('gdpo').expr)}$$"))

# %%
facts = explore.posts_facts()
display(
    Markdown("\n".join(f"- **{claim}**: $${latex}$$ numerically confirmed: **{ok}**" for claim, latex, ok in facts))
)
assert all(ok for _, _, ok in facts)

# %% [markdown]
# As pi(y_l) goes to 0 the loss vanishes while its probability-view gradient behaves like
# pi(y_l)^(beta - 1): the limits below are computed by sympy.

# %%
d = gradlab.derivative("gdpo", "p_l", "probability")
for beta in ("1/10", "1/2", "2"):
    print(beta, gradlab.limit(d, "p_l", 0, values={"beta": gradlab.parse(beta), "gamma": gradlab.parse(beta)}))
print("loss:", gradlab.limit(gradlab.in_view("gdpo", "probability"), "p_l", 0))

# %% [markdown]
# The same divergence, drawn: |dl/dpi(y_l)| against pi(y_l) on log axes has slope beta - 1.
# Move the slider: below beta = 1 the force grows without bound as pi(y_l) shrinks.

# %%
panel, update = explore.limit_view("gdpo")
display(panel)

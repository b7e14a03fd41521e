# %% [markdown]
# # The two posts, derived live
#
# Every claim of `posts.md` ("What the formulas imply"), derived by gradlab from the one
# definition of the two-coefficient loss `gdpo`, shown as LaTeX and checked numerically in
# high precision against the hand formula. The last row is the first post's proper loss: the
# derivative of its integrand pi(y) pi(y') l carries the score-function term, and its exact
# gradient over a toy policy agrees with JAX autodiff.
#
# Static rendering: the force that grows with length is in
# [`figures/force_vs_length.png`](../figures/force_vs_length.png).

# %%
import gradlab
from gradlab import explore, runtime
from IPython.display import Markdown, display

runtime.configure()  # entry point: float64 JAX and the compilation cache

display(Markdown(f"$$\\ell_{{gdpo}} = {gradlab.latex(gradlab.get_loss('gdpo').expr)}$$"))

# %%
facts = explore.posts_facts()
display(Markdown("\n".join(f"- **{claim}**: $${latex}$$ numerically confirmed: **{ok}**" for claim, latex, ok in facts)))
assert all(ok for _, _, ok in facts)

# %% [markdown]
# As pi(y_l) goes to 0 the loss vanishes while its probability-view gradient behaves like
# pi(y_l)^(beta - 1): the limits below are computed by sympy.

# %%
d = gradlab.derivative("gdpo", "p_l", "probability")
for beta in ("1/10", "1/2", "2"):
    print(beta, gradlab.limit(d, "p_l", 0, values={"beta": gradlab.parse(beta), "gamma": gradlab.parse(beta)}))
print("loss:", gradlab.limit(gradlab.in_view("gdpo", "probability"), "p_l", 0))

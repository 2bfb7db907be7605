// Render the math that pymdownx.arithmatex (generic mode) wraps in .arithmatex spans and divs.
document$.subscribe(() => {
  for (const el of document.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});

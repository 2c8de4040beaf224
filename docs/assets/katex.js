// Render the maths that pymdownx.arithmatex (generic mode) leaves in the page, with the KaTeX
// copy vendored under assets/katex (so pages render without a network).
function renderMaths() {
  document.querySelectorAll(".arithmatex").forEach((element) => {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\[", right: "\\]", display: true },
        { left: "\\(", right: "\\)", display: false },
      ],
      throwOnError: false,
    });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMaths);  // mkdocs-material's instant navigation
} else {
  document.addEventListener("DOMContentLoaded", renderMaths);
}

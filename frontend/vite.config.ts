// One IIFE script and one stylesheet, written into the Python package so users need no Node.js.
// The same two files are inlined into exported HTML and served by `attnscope serve` under /static.
import { defineConfig } from "vite";

export default defineConfig({
  build: {
    lib: {
      entry: "src/main.ts",
      name: "attnscope",
      formats: ["iife"],
      fileName: () => "viewer.js",
      cssFileName: "viewer",
    },
    outDir: "../src/attnscope/viz/static",
    emptyOutDir: true,
    target: "es2020",
    minify: true,
    sourcemap: false,
    reportCompressedSize: false,
  },
});

"""onnxprune inside other toolchains: `olive`, an Olive pass (`pip install 'onnxprune[olive]'`)."""

# Shared locations for setup, tests, demo and benchmark. Sourced, not run.
export DOPPLER_DEPS=${DOPPLER_DEPS:-/opt/doppler}
export DOPPLER_VENV=${DOPPLER_VENV:-$DOPPLER_DEPS/venv}
export DOPPLER_ORT_LIB=${DOPPLER_ORT_LIB:-$DOPPLER_DEPS/lib/libonnxruntime.so.1.31.1}
export DOPPLER_PG18=${DOPPLER_PG18:-$DOPPLER_DEPS/pgserver/pgserver/pginstall}
export DOPPLER_MODELS=${DOPPLER_MODELS:-$DOPPLER_DEPS/models}
export DOPPLER_FIXTURES=${DOPPLER_FIXTURES:-$DOPPLER_DEPS/fixtures}
export DOPPLER_PHOTOS=${DOPPLER_PHOTOS:-$DOPPLER_DEPS/photos}

# doppler's version (Cargo.toml) and the ONNX Runtime version of the venv's wheel: what the packages
# (scripts/bundle, scripts/package, scripts/check_packages) name and record.
doppler_version() { sed -n 's/^version = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml" | head -n 1; }
ort_version() { "$DOPPLER_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))'; }

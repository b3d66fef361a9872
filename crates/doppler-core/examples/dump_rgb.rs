//! Debug aid: decode an image as doppler does and write its RGB8 pixels (and the 224×224 resize)
//! as raw files, for comparison with PIL. Usage: dump_rgb IMAGE OUT_PREFIX
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(&args[1]).expect("read");
    let img = doppler_core::decode_rgb(&bytes, &args[1], &Default::default()).expect("decode");
    std::fs::write(format!("{}.rgb", args[2]), &img.data).expect("write");
    let r = doppler_core::resize::resize_bilinear(&img, 224, 224);
    std::fs::write(format!("{}.224.rgb", args[2]), &r.data).expect("write");
    println!("{}x{}", img.width, img.height);
}

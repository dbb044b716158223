pub mod nf4;

pub mod bnb;
pub mod nf4;
